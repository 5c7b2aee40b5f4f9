//! The file as written: strict serde structs (`deny_unknown_fields` everywhere), shared by TOML
//! and JSON. Values wrong on their own (a duration of "5xs", a port of 70000, an unknown
//! protocol) fail here, with the position serde reports. `expecting` names the tables in type
//! errors ("expected an ingress table") instead of the Rust struct.

use std::collections::BTreeMap;
use std::fmt;

use rig_proxy::policy::{ChaosSpec, HumanDuration, Protocol};
use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a spec table")]
pub(crate) struct RawSpec {
    pub(crate) name: String,
    pub(crate) seed: Option<u64>,
    pub(crate) observe: Option<bool>,
    #[serde(default)]
    pub(crate) services: BTreeMap<String, RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service table (command, cwd, env, stop_grace, ingresses, egresses)"
)]
pub(crate) struct RawService {
    pub(crate) command: Vec<String>,
    pub(crate) cwd: Option<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) stop_grace: Option<HumanDuration>,
    #[serde(default)]
    pub(crate) ingresses: BTreeMap<String, RawIngress>,
    #[serde(default)]
    pub(crate) egresses: BTreeMap<String, RawEgress>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an ingress table (protocol, port, ready)"
)]
pub(crate) struct RawIngress {
    pub(crate) protocol: Protocol,
    pub(crate) port: Option<u16>,
    pub(crate) ready: Option<RawReady>,
}

/// `ready = false | true | { path, service, timeout }`.
#[derive(Debug)]
pub(crate) enum RawReady {
    Flag(bool),
    Options(RawReadyOptions),
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a ready table (path, service, timeout)"
)]
pub(crate) struct RawReadyOptions {
    pub(crate) path: Option<String>,
    pub(crate) service: Option<String>,
    pub(crate) timeout: Option<HumanDuration>,
}

// By hand rather than `#[serde(untagged)]`: untagged enums swallow the inner error ("data did not
// match any variant"), and an unknown key inside `ready` must be named.
impl<'de> Deserialize<'de> for RawReady {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawReady;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("false to disable the readiness check, or a table with path, service and timeout")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawReady, E> {
                Ok(RawReady::Flag(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawReady, A::Error> {
                RawReadyOptions::deserialize(MapAccessDeserializer::new(map)).map(RawReady::Options)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an egress table (service, ingress, observe, chaos)"
)]
pub(crate) struct RawEgress {
    pub(crate) service: String,
    pub(crate) ingress: Option<String>,
    pub(crate) observe: Option<bool>,
    pub(crate) chaos: Option<ChaosSpec>,
}
