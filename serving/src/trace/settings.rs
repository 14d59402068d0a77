//! The standard `OTEL_*` variables, checked: where spans go, in which encoding, which are
//! recorded, and what the resource says.

use std::fmt;
use std::path::PathBuf;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Sampler;

use crate::error::ConfigError;

/// The standard OpenTelemetry variables this service reads. Only the trace signal is
/// exported, over OTLP/HTTP; `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the
/// other `OTEL_BSP_*` are read by the SDK as it documents them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceArgs {
    /// Base URL of an OTLP/HTTP collector (`/v1/traces` is appended), such as
    /// `http://otel-collector:4318`. Unset (and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset),
    /// nothing is exported; requests still get a trace id for their log lines.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// Full URL traces are sent to, used as it is; it takes precedence over
    /// OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otel_exporter_otlp_traces_endpoint: Option<String>,

    /// `http/protobuf` (the default) or `http/json`. `grpc` is not built in: point the
    /// endpoint at the collector's OTLP/HTTP port (4318) instead.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_name = "PROTOCOL")]
    pub otel_exporter_otlp_protocol: Option<String>,

    /// PEM file with the CA certificates that an `https://` collector's certificate must chain
    /// to; unset, the system's roots.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PEM_FILE")]
    pub otel_exporter_otlp_certificate: Option<PathBuf>,

    /// `otlp` (the default, when an endpoint is set) or `none`.
    #[arg(long, env = "OTEL_TRACES_EXPORTER", value_name = "EXPORTER")]
    pub otel_traces_exporter: Option<String>,

    /// The service name traces carry; the binary's name when unset.
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,

    /// Comma-separated `key=value` resource attributes (percent-encoded values), such as
    /// `cloud.provider=aws,deployment.environment=prod`.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_name = "KEY=VALUE,...")]
    pub otel_resource_attributes: Option<String>,

    /// Which requests are recorded: `parentbased_always_on` (the default), `always_on`,
    /// `always_off`, `traceidratio`, `parentbased_always_off` or `parentbased_traceidratio`.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER")]
    pub otel_traces_sampler: Option<String>,

    /// The ratio for the `traceidratio` samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "RATIO")]
    pub otel_traces_sampler_arg: Option<String>,

    /// The longest a finished span waits in the queue before it is sent, in milliseconds
    /// (default 5000; 1 to 60000).
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub otel_bsp_schedule_delay: Option<u64>,

    /// `true` turns the export off, whatever else is set.
    #[arg(long, env = "OTEL_SDK_DISABLED", value_name = "BOOL")]
    pub otel_sdk_disabled: Option<String>,
}

/// Where and how spans are exported, once the variables have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    /// The URL spans are posted to.
    pub url: String,
    /// `http/protobuf` or `http/json`.
    pub json: bool,
    /// The sampler, as named in OTEL_TRACES_SAMPLER.
    pub sampler: SamplerSetting,
    /// CA certificates for an `https://` collector.
    pub ca_file: Option<PathBuf>,
    /// OTEL_RESOURCE_ATTRIBUTES, decoded.
    pub resource: Vec<KeyValue>,
}

/// OTEL_TRACES_SAMPLER and its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSetting {
    /// Whether a sampled or unsampled parent decides.
    pub parent_based: bool,
    /// The share of new traces recorded: 1 for `always_on`, 0 for `always_off`.
    pub ratio: f64,
}

impl SamplerSetting {
    pub(super) fn sampler(self) -> Sampler {
        let root = if self.ratio >= 1.0 {
            Sampler::AlwaysOn
        } else if self.ratio <= 0.0 {
            Sampler::AlwaysOff
        } else {
            Sampler::TraceIdRatioBased(self.ratio)
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

impl fmt::Display for SamplerSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = match self.ratio {
            r if r >= 1.0 => "always_on".to_owned(),
            r if r <= 0.0 => "always_off".to_owned(),
            r => format!("traceidratio {r}"),
        };
        if self.parent_based {
            write!(f, "parentbased_{root}")
        } else {
            f.write_str(&root)
        }
    }
}

impl TraceArgs {
    /// The export these variables ask for: `None` when no endpoint is set, or the export is
    /// turned off. Every error names the variable to fix.
    pub fn export(&self) -> Result<Option<ExportSettings>, ConfigError> {
        let disabled = match self.otel_sdk_disabled.as_deref().map(str::trim) {
            None | Some("") => false,
            Some(value) if value.eq_ignore_ascii_case("true") => true,
            Some(value) if value.eq_ignore_ascii_case("false") => false,
            Some(value) => {
                return Err(ConfigError::new(
                    "OTEL_SDK_DISABLED",
                    format!("'{value}' is neither true nor false"),
                ));
            }
        };
        let exporter_on = match self.otel_traces_exporter.as_deref().map(str::trim) {
            None | Some("") | Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_EXPORTER",
                    format!("'{other}' is not supported; use otlp or none"),
                ));
            }
        };
        let json = match self.otel_exporter_otlp_protocol.as_deref().map(str::trim) {
            None | Some("") | Some("http/protobuf") => false,
            Some("http/json") => true,
            Some("grpc") => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    "grpc is not built in; use http/protobuf and the collector's OTLP/HTTP port (4318)",
                ));
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    format!("'{other}' is not a protocol; use http/protobuf or http/json"),
                ));
            }
        };
        let sampler = self.sampler()?;
        let url = match (
            non_empty(&self.otel_exporter_otlp_traces_endpoint),
            non_empty(&self.otel_exporter_otlp_endpoint),
        ) {
            (Some(url), _) => checked_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)?,
            (None, Some(base)) => {
                let base = checked_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        // Read (and checked) even when the export is off, so that a bad value fails at once.
        let resource = match non_empty(&self.otel_resource_attributes) {
            Some(raw) => resource_attributes(raw)?,
            None => Vec::new(),
        };
        if disabled || !exporter_on {
            return Ok(None);
        }
        Ok(Some(ExportSettings {
            url,
            json,
            sampler,
            ca_file: self.otel_exporter_otlp_certificate.clone(),
            resource,
        }))
    }

    fn sampler(&self) -> Result<SamplerSetting, ConfigError> {
        let ratio = match non_empty(&self.otel_traces_sampler_arg) {
            None => 1.0,
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|ratio| (0.0..=1.0).contains(ratio))
                .ok_or_else(|| {
                    ConfigError::new(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("'{arg}' is not a ratio from 0 to 1"),
                    )
                })?,
        };
        let name = non_empty(&self.otel_traces_sampler).unwrap_or("parentbased_always_on");
        let (parent_based, root) = match name.trim().strip_prefix("parentbased_") {
            Some(root) => (true, root),
            None => (false, name.trim()),
        };
        let ratio = match root {
            "always_on" => 1.0,
            "always_off" => 0.0,
            "traceidratio" => ratio,
            _ => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "'{name}' is not supported; use always_on, always_off, traceidratio or their parentbased_ forms"
                    ),
                ));
            }
        };
        Ok(SamplerSetting {
            parent_based,
            ratio,
        })
    }
}

pub(super) fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|value| !value.trim().is_empty())
}

fn checked_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    match url::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(value.to_owned())
        }
        Ok(_) => Err(ConfigError::new(
            variable,
            format!("'{value}' must be an http:// or https:// URL with a host"),
        )),
        Err(err) => Err(ConfigError::new(
            variable,
            format!("'{value}' is not a URL: {err}"),
        )),
    }
}

/// OTEL_RESOURCE_ATTRIBUTES as key-value pairs: `key=value` separated by commas, values
/// percent-decoded (W3C Baggage's format, as the specification asks).
fn resource_attributes(raw: &str) -> Result<Vec<KeyValue>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("'{pair}' is not key=value"),
                    )
                })?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .map_err(|_| {
                    ConfigError::new(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("the value of '{}' is not UTF-8 once decoded", key.trim()),
                    )
                })?;
            Ok(KeyValue::new(key.trim().to_owned(), value.into_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(vars: &[(&str, &str)]) -> TraceArgs {
        let get = |name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        };
        TraceArgs {
            otel_exporter_otlp_endpoint: get("endpoint"),
            otel_exporter_otlp_traces_endpoint: get("traces_endpoint"),
            otel_exporter_otlp_protocol: get("protocol"),
            otel_exporter_otlp_certificate: None,
            otel_traces_exporter: get("exporter"),
            otel_service_name: None,
            otel_resource_attributes: get("attributes"),
            otel_traces_sampler: get("sampler"),
            otel_traces_sampler_arg: get("arg"),
            otel_bsp_schedule_delay: None,
            otel_sdk_disabled: get("disabled"),
        }
    }

    fn error(vars: &[(&str, &str)]) -> String {
        args(vars)
            .export()
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint_or_when_turned_off() {
        assert_eq!(args(&[]).export().expect("valid"), None);
        assert_eq!(
            args(&[("sampler", "always_on")]).export().expect("valid"),
            None
        );
        let on = [("endpoint", "http://collector:4318")];
        assert!(args(&on).export().expect("valid").is_some());
        for off in [("disabled", "true"), ("exporter", "none")] {
            assert_eq!(args(&[on[0], off]).export().expect("valid"), None);
        }
    }

    #[test]
    fn the_traces_endpoint_is_used_as_it_is_and_the_base_gets_the_signal_path() {
        let base = args(&[("endpoint", "http://collector:4318/")]).export();
        assert_eq!(
            base.expect("valid").expect("on").url,
            "http://collector:4318/v1/traces"
        );
        let full = args(&[
            ("endpoint", "http://collector:4318"),
            ("traces_endpoint", "https://traces.example:443/otlp"),
        ])
        .export();
        assert_eq!(
            full.expect("valid").expect("on").url,
            "https://traces.example:443/otlp"
        );
    }

    #[test]
    fn the_samplers_of_the_specification_are_read_with_their_ratio() {
        let on = ("endpoint", "http://c:4318");
        let setting = |vars: &[(&str, &str)]| {
            let mut all = vec![on];
            all.extend_from_slice(vars);
            args(&all).export().expect("valid").expect("on").sampler
        };
        assert_eq!(
            setting(&[]),
            SamplerSetting {
                parent_based: true,
                ratio: 1.0
            }
        );
        assert_eq!(
            setting(&[("sampler", "traceidratio"), ("arg", "0.01")]),
            SamplerSetting {
                parent_based: false,
                ratio: 0.01
            }
        );
        assert_eq!(
            setting(&[("sampler", "parentbased_always_off")]),
            SamplerSetting {
                parent_based: true,
                ratio: 0.0
            }
        );
        assert_eq!(
            setting(&[("sampler", "parentbased_traceidratio"), ("arg", "0.5")]).to_string(),
            "parentbased_traceidratio 0.5"
        );
    }

    #[test]
    fn bad_values_name_their_variable_and_what_would_do() {
        let on = ("endpoint", "http://c:4318");
        assert!(error(&[on, ("protocol", "grpc")]).contains("OTEL_EXPORTER_OTLP_PROTOCOL"));
        assert!(error(&[on, ("protocol", "grpc")]).contains("4318"));
        assert!(error(&[on, ("protocol", "thrift")]).contains("http/json"));
        assert!(error(&[on, ("sampler", "jaeger_remote")]).contains("OTEL_TRACES_SAMPLER"));
        assert!(
            error(&[on, ("sampler", "traceidratio"), ("arg", "2")])
                .contains("OTEL_TRACES_SAMPLER_ARG")
        );
        assert!(error(&[on, ("arg", "half")]).contains("OTEL_TRACES_SAMPLER_ARG"));
        assert!(error(&[("endpoint", "collector:4318")]).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert!(error(&[("endpoint", "ftp://c/")]).contains("http://"));
        assert!(error(&[on, ("disabled", "maybe")]).contains("OTEL_SDK_DISABLED"));
        assert!(error(&[on, ("exporter", "zipkin")]).contains("OTEL_TRACES_EXPORTER"));
        assert!(error(&[on, ("attributes", "cloud.provider")]).contains("key=value"));
    }

    #[test]
    fn resource_attributes_are_percent_decoded() {
        let attributes = resource_attributes("cloud.provider=aws, team=a%2Cb ,,").expect("valid");
        assert_eq!(
            attributes,
            vec![
                KeyValue::new("cloud.provider", "aws"),
                KeyValue::new("team", "a,b")
            ]
        );
    }
}
