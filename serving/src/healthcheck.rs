//! `healthcheck`: probes the service's own `/livez` on the admin port, for container runtimes
//! whose images have no curl (the images have no shell either).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// Time for the whole probe.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Probes `http://<admin_addr>/livez` (loopback when the admin listener binds every address) and
/// returns 0 for a 200 and 1 for anything else, saying why on stderr.
pub fn run(admin_addr: SocketAddr) -> ExitCode {
    match probe(admin_addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}

fn probe(admin_addr: SocketAddr) -> Result<(), String> {
    let target = match admin_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin_addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin_addr.port())
        }
        _ => admin_addr,
    };
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
        .map_err(|err| format!("cannot connect to {target}: {err}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|err| err.to_string())?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|err| err.to_string())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: healthcheck\r\nConnection: close\r\n\r\n",
        crate::admin::LIVEZ
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|err| format!("cannot send the probe: {err}"))?;
    let mut head = [0u8; 64];
    let mut filled = 0;
    while filled < 12 {
        match stream.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) => return Err(format!("no answer from {target}: {err}")),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..filled]);
    if status_line.starts_with("HTTP/1.1 200") || status_line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!(
            "{target}{} answered {:?}",
            crate::admin::LIVEZ,
            status_line.lines().next().unwrap_or_default()
        ))
    }
}
