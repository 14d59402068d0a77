//! The nginx pair that Petra and Klaus are measured against: its two configurations, filled in
//! with ports and certificate paths when the stack starts.

/// nginx as Petra: `hello` over TLS, client certificates required, two workers, no logs.
/// `keepalive_requests` is raised so that nginx does not close a client's connection after
/// 1,000 requests, which hyper never does.
pub(super) const PETRA_CONF: &str = r#"
daemon off;
worker_processes 2;
worker_rlimit_nofile 65536;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:@PORT@ ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate @CERT@;
        ssl_certificate_key @KEY@;
        ssl_client_certificate @CLIENT_CA@;
        ssl_verify_client on;
        default_type "text/plain; charset=utf-8";
        location / { return 200 "hello"; }
    }
}
"#;

/// nginx as Klaus: an HTTPS and a plain-HTTP front, `proxy_pass` over HTTPS with a client
/// certificate and verification of nginx-Petra's certificate, an upstream keep-alive pool at
/// least as large as the client count, and `sub_filter` to append ` world`.
pub(super) const KLAUS_CONF: &str = r#"
daemon off;
worker_processes 2;
worker_rlimit_nofile 65536;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    keepalive_requests 1000000;
    upstream petra {
        server 127.0.0.1:@PETRA_PORT@;
        keepalive 1024;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:@HTTPS_PORT@ ssl;
        listen 127.0.0.1:@HTTP_PORT@;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate @CERT@;
        ssl_certificate_key @KEY@;
        location / {
            proxy_pass https://petra;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Accept-Encoding "";
            proxy_ssl_certificate @CLIENT_CERT@;
            proxy_ssl_certificate_key @CLIENT_KEY@;
            proxy_ssl_trusted_certificate @CA@;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            sub_filter_types text/plain;
            sub_filter_once on;
            sub_filter "hello" "hello world";
        }
    }
}
"#;
