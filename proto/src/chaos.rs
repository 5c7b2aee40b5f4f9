//! The chaos policy on the wire: `TryFrom<v1::ChaosSpec>` for the domain [`ChaosSpec`] (the
//! error names the offending field) and `From<&ChaosSpec>` for `v1::ChaosSpec`. Both
//! destructure, so a field added to either side cannot be forgotten here.

use std::collections::BTreeMap;

use rig_proxy::policy::{
    ByteRate, ByteSize, ChaosSpec, Direction, DistributionKind, GrpcCode, HangThen, HumanDuration,
    MatchSpec, PartitionMode, PartitionSetting, PolicyError, Ratio, SlicerSpec, Status,
    WeightedStatus,
};

use crate::v1 as pb;

fn field<T: std::str::FromStr<Err = String>>(
    name: &str,
    v: Option<String>,
) -> Result<Option<T>, PolicyError> {
    v.map(|s| s.parse().map_err(|e| PolicyError::new(name, e)))
        .transpose()
}

fn ratio(name: &str, v: Option<f64>) -> Result<Option<Ratio>, PolicyError> {
    v.map(|r| Ratio::new(r).map_err(|e| PolicyError::new(name, e)))
        .transpose()
}

/// A chaos policy from the wire; the error names the offending field.
impl TryFrom<pb::ChaosSpec> for ChaosSpec {
    type Error = PolicyError;

    fn try_from(p: pb::ChaosSpec) -> Result<ChaosSpec, PolicyError> {
        let pb::ChaosSpec {
            latency,
            jitter,
            distribution,
            latency_p99,
            latency_direction,
            error_rate,
            status,
            statuses,
            body,
            headers,
            grpc_code,
            grpc_message,
            reset_after,
            hang_rate,
            hang_for,
            hang_then,
            partition,
            direction,
            keep_connections,
            bandwidth,
            bandwidth_upstream,
            bandwidth_downstream,
            bandwidth_per_connection,
            slow_close,
            slicer,
            limit_data,
            r#match,
            seed,
            ttl,
        } = p;
        let partition = match partition.as_deref().map(str::trim) {
            None => None,
            Some("true") => Some(PartitionSetting::Flag(true)),
            Some("false") => Some(PartitionSetting::Flag(false)),
            Some(mode) => Some(PartitionSetting::Mode(
                mode.parse::<PartitionMode>()
                    .map_err(|e| PolicyError::new("partition", e))?,
            )),
        };
        let statuses = statuses
            .into_iter()
            .map(|w| {
                Ok(WeightedStatus {
                    status: Status::new(w.status).map_err(|e| PolicyError::new("statuses", e))?,
                    weight: if w.weight == 0 { 1 } else { w.weight },
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        let slicer = slicer
            .map(|s| {
                let pb::Slicer {
                    average_size,
                    size_variation,
                    delay,
                } = s;
                Ok::<_, PolicyError>(SlicerSpec {
                    average_size: average_size
                        .parse::<ByteSize>()
                        .map_err(|e| PolicyError::new("slicer.average_size", e))?,
                    size_variation: if size_variation.is_empty() {
                        ByteSize(0)
                    } else {
                        size_variation
                            .parse()
                            .map_err(|e| PolicyError::new("slicer.size_variation", e))?
                    },
                    delay: if delay.is_empty() {
                        HumanDuration::default()
                    } else {
                        delay
                            .parse()
                            .map_err(|e| PolicyError::new("slicer.delay", e))?
                    },
                })
            })
            .transpose()?;
        let matcher = r#match.map(|m| {
            let pb::Match {
                methods,
                path_prefixes,
                headers,
                grpc_service,
                grpc_method,
            } = m;
            MatchSpec {
                methods,
                path_prefixes,
                headers: headers.into_iter().collect(),
                grpc_service,
                grpc_method,
            }
        });
        Ok(ChaosSpec {
            latency: field("latency", latency)?,
            jitter: field("jitter", jitter)?,
            distribution: field::<DistributionKind>("distribution", distribution)?,
            latency_p99: field("latency_p99", latency_p99)?,
            latency_direction: field::<Direction>("latency_direction", latency_direction)?,
            error_rate: ratio("error_rate", error_rate)?,
            status: status
                .map(|s| Status::new(s).map_err(|e| PolicyError::new("status", e)))
                .transpose()?,
            statuses,
            body,
            headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
            grpc_code: field::<GrpcCode>("grpc_code", grpc_code)?,
            grpc_message,
            reset_after: field::<ByteSize>("reset_after", reset_after)?,
            hang_rate: ratio("hang_rate", hang_rate)?,
            hang_for: field("hang_for", hang_for)?,
            hang_then: field::<HangThen>("hang_then", hang_then)?,
            partition,
            direction: field::<Direction>("direction", direction)?,
            keep_connections,
            bandwidth: field::<ByteRate>("bandwidth", bandwidth)?,
            bandwidth_upstream: field::<ByteRate>("bandwidth_upstream", bandwidth_upstream)?,
            bandwidth_downstream: field::<ByteRate>("bandwidth_downstream", bandwidth_downstream)?,
            bandwidth_per_connection,
            slow_close: field("slow_close", slow_close)?,
            slicer,
            limit_data: field::<ByteSize>("limit_data", limit_data)?,
            matcher,
            seed,
            ttl: field("ttl", ttl)?,
        })
    }
}

fn s<T: ToString>(v: Option<T>) -> Option<String> {
    v.map(|v| v.to_string())
}

fn lower<T: serde::Serialize>(v: Option<T>) -> Option<String> {
    v.and_then(|v| match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Some(s),
        Ok(other) => Some(other.to_string()),
        Err(_) => None,
    })
}

/// A chaos policy for the wire.
impl From<&ChaosSpec> for pb::ChaosSpec {
    fn from(c: &ChaosSpec) -> pb::ChaosSpec {
        let ChaosSpec {
            latency,
            jitter,
            distribution,
            latency_p99,
            latency_direction,
            error_rate,
            status,
            statuses,
            body,
            headers,
            grpc_code,
            grpc_message,
            reset_after,
            hang_rate,
            hang_for,
            hang_then,
            partition,
            direction,
            keep_connections,
            bandwidth,
            bandwidth_upstream,
            bandwidth_downstream,
            bandwidth_per_connection,
            slow_close,
            slicer,
            limit_data,
            matcher,
            seed,
            ttl,
        } = c.clone();
        pb::ChaosSpec {
            latency: s(latency),
            jitter: s(jitter),
            distribution: lower(distribution),
            latency_p99: s(latency_p99),
            latency_direction: lower(latency_direction),
            error_rate: error_rate.map(Ratio::get),
            status: status.map(|s| s.get() as u32),
            statuses: statuses
                .into_iter()
                .map(|w| pb::WeightedStatus {
                    status: w.status.get() as u32,
                    weight: w.weight,
                })
                .collect(),
            body,
            headers: headers.into_iter().collect(),
            grpc_code: s(grpc_code),
            grpc_message,
            reset_after: s(reset_after),
            hang_rate: hang_rate.map(Ratio::get),
            hang_for: s(hang_for),
            hang_then: lower(hang_then),
            partition: partition.map(|p| match p {
                PartitionSetting::Flag(b) => b.to_string(),
                PartitionSetting::Mode(m) => lower(Some(m)).unwrap_or_default(),
            }),
            direction: lower(direction),
            keep_connections,
            bandwidth: s(bandwidth),
            bandwidth_upstream: s(bandwidth_upstream),
            bandwidth_downstream: s(bandwidth_downstream),
            bandwidth_per_connection,
            slow_close: s(slow_close),
            slicer: slicer.map(|sl| pb::Slicer {
                average_size: sl.average_size.to_string(),
                size_variation: sl.size_variation.to_string(),
                delay: sl.delay.to_string(),
            }),
            limit_data: s(limit_data),
            r#match: matcher.map(|m| pb::Match {
                methods: m.methods,
                path_prefixes: m.path_prefixes,
                headers: m.headers.into_iter().collect(),
                grpc_service: m.grpc_service,
                grpc_method: m.grpc_method,
            }),
            seed,
            ttl: s(ttl),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_wire() {
        let spec: ChaosSpec = toml::from_str(
            r#"
            latency = "50ms"
            jitter = "10ms"
            distribution = "normal"
            error_rate = 0.25
            statuses = [{ status = 503, weight = 3 }, { status = 500 }]
            headers = { "Retry-After" = "2" }
            hang_rate = 0.1
            hang_for = "2s"
            hang_then = "timeout"
            partition = "blackhole"
            direction = "upstream"
            keep_connections = true
            bandwidth = "1MiB/s"
            bandwidth_per_connection = true
            seed = 9
            ttl = "30s"
            match = { methods = ["GET"], path_prefixes = ["/api"] }
            "#,
        )
        .unwrap();
        let wire = pb::ChaosSpec::from(&spec);
        let back = ChaosSpec::try_from(wire).unwrap();
        assert_eq!(back, spec);
        let tcp: ChaosSpec = toml::from_str(
            "reset_after = \"1KiB\"\nslow_close = \"1s\"\nlimit_data = 4096\nlatency_direction = \"downstream\"\nslicer = { average_size = 64, size_variation = 8, delay = \"1ms\" }",
        )
        .unwrap();
        assert_eq!(ChaosSpec::try_from(pb::ChaosSpec::from(&tcp)).unwrap(), tcp);
    }

    #[test]
    fn wire_errors_name_the_field() {
        let err = ChaosSpec::try_from(pb::ChaosSpec {
            latency: Some("5xs".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "latency");
        let err = ChaosSpec::try_from(pb::ChaosSpec {
            error_rate: Some(1.5),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "error_rate");
        let err = ChaosSpec::try_from(pb::ChaosSpec {
            grpc_code: Some("NOPE".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "grpc_code");
        let err = ChaosSpec::try_from(pb::ChaosSpec {
            bandwidth: Some("0".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "bandwidth");
    }
}
