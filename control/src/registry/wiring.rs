//! Wiring: the environment, command and working directory a service is launched with, from
//! its spec and the addresses of its ingresses and egress edges. Pure: no sockets, no
//! processes, no process environment except through the `lookup` it is given.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rig_proxy::policy::Protocol;

use crate::spec::{self, Service, Spec, env_prefix};

/// Where one edge's source is told to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WiredEdge {
    /// The edge's proxy, or the target itself when the edge is not observed.
    pub addr: SocketAddr,
    /// The target ingress's address.
    pub target: SocketAddr,
    /// Whether a proxy sits on the edge.
    pub observed: bool,
}

/// The addresses rigd allocated for an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// By (service, ingress).
    pub ingresses: HashMap<(String, String), SocketAddr>,
    /// By edge name, `source/egress`.
    pub edges: HashMap<String, WiredEdge>,
}

/// What a service is launched with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLaunch {
    pub env: BTreeMap<String, String>,
    /// argv with `${VAR}` expanded.
    pub command: Vec<String>,
    pub cwd: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WiringError {
    /// A `${VAR}` in the command or an env value cannot be expanded.
    #[error("service {service}: {what}: {message}")]
    Expand {
        service: String,
        what: String,
        message: String,
    },
    /// The addresses given lack one the spec needs (a bug in the caller).
    #[error("service {service}: no address for {what}")]
    MissingAddress { service: String, what: String },
}

/// The launch of `svc` (a service of `spec`): the injected variables of the README's table
/// "Environment variables injected into each service" over the service's own `env`, then
/// `${VAR}` expanded in env values and command against that environment, falling back to
/// `lookup` (rigd's own environment). A relative-less `cwd` defaults to `base_dir`.
pub fn service_env(
    spec: &Spec,
    svc: &Service,
    addrs: &Addresses,
    base_dir: &Path,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<ServiceLaunch, WiringError> {
    let mut env: BTreeMap<String, String> = svc.env.clone();
    let ingresses = wire_ingresses(svc, addrs, &mut env)?;
    let egresses = wire_egresses(svc, addrs, &mut env)?;
    env.insert("RIG_SERVICE".into(), svc.name.clone());
    env.insert("RIG_ENV".into(), spec.name.clone());
    env.insert(
        "RIG_WIRING".into(),
        serde_json::json!({"env": spec.name, "service": svc.name, "ingresses": ingresses, "egresses": egresses})
            .to_string(),
    );
    // A variable refers to the service's own variables first, then to rigd's environment; in
    // its own value (`RIG_TOKEN = "${RIG_TOKEN}"`, as in Compose) it means rigd's variable.
    let expanded = |what: &str, v: &str, own: &str| {
        let lookup = |k: &str| {
            if k == own {
                return lookup(k);
            }
            env.get(k).cloned().or_else(|| lookup(k))
        };
        spec::expand_vars(v, lookup).map_err(|message| WiringError::Expand {
            service: svc.name.clone(),
            what: what.to_string(),
            message,
        })
    };
    let mut expanded_env = BTreeMap::new();
    for (k, v) in &env {
        expanded_env.insert(k.clone(), expanded(&format!("env {k}"), v, k)?);
    }
    // The command sees the expanded variables.
    let command = svc
        .command
        .iter()
        .map(|a| {
            let lookup = |k: &str| expanded_env.get(k).cloned().or_else(|| lookup(k));
            spec::expand_vars(a, lookup).map_err(|message| WiringError::Expand {
                service: svc.name.clone(),
                what: "command".to_string(),
                message,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceLaunch {
        env: expanded_env,
        command,
        cwd: svc.cwd.clone().unwrap_or_else(|| base_dir.to_path_buf()),
    })
}

/// HOST/PORT for the default ingress, `<NAME>_HOST`/`<NAME>_PORT` for the others; returns
/// their part of RIG_WIRING.
fn wire_ingresses(
    svc: &Service,
    addrs: &Addresses,
    env: &mut BTreeMap<String, String>,
) -> Result<serde_json::Map<String, serde_json::Value>, WiringError> {
    let mut wiring = serde_json::Map::new();
    for ing in svc.ingresses.values() {
        let addr = *addrs
            .ingresses
            .get(&(svc.name.clone(), ing.name.clone()))
            .ok_or_else(|| WiringError::MissingAddress {
                service: svc.name.clone(),
                what: format!("ingress {}", ing.name),
            })?;
        // The service's only ingress, or the one named `default`, gets HOST/PORT.
        let is_default = svc.default_ingress().is_some_and(|d| d.name == ing.name);
        let prefix = if is_default {
            String::new()
        } else {
            format!("{}_", env_prefix(&ing.name))
        };
        env.insert(format!("{prefix}HOST"), addr.ip().to_string());
        env.insert(format!("{prefix}PORT"), addr.port().to_string());
        wiring.insert(
            ing.name.clone(),
            serde_json::json!({"protocol": ing.protocol, "host": addr.ip().to_string(), "port": addr.port()}),
        );
    }
    Ok(wiring)
}

/// `<EGRESS>_HOST/_PORT/_ADDR` (and `_URL` for http and grpc); returns their part of
/// RIG_WIRING.
fn wire_egresses(
    svc: &Service,
    addrs: &Addresses,
    env: &mut BTreeMap<String, String>,
) -> Result<serde_json::Map<String, serde_json::Value>, WiringError> {
    let mut wiring = serde_json::Map::new();
    for eg in svc.egresses.values() {
        let e = addrs
            .edges
            .get(&format!("{}/{}", svc.name, eg.name))
            .ok_or_else(|| WiringError::MissingAddress {
                service: svc.name.clone(),
                what: format!("egress {}", eg.name),
            })?;
        let p = env_prefix(&eg.name);
        let a = e.addr;
        env.insert(format!("{p}_HOST"), a.ip().to_string());
        env.insert(format!("{p}_PORT"), a.port().to_string());
        env.insert(format!("{p}_ADDR"), a.to_string());
        let url =
            matches!(eg.protocol, Protocol::Http | Protocol::Grpc).then(|| format!("http://{a}"));
        if let Some(u) = &url {
            env.insert(format!("{p}_URL"), u.clone());
        }
        wiring.insert(
            eg.name.clone(),
            serde_json::json!({
                "service": eg.service, "ingress": eg.ingress, "protocol": eg.protocol,
                "host": a.ip().to_string(), "port": a.port(), "addr": a.to_string(), "url": url,
                "observed": e.observed, "target": e.target.to_string(),
            }),
        );
    }
    Ok(wiring)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "shop"
[services.store]
command = ["kv", "--listen", "${HOST}:${PORT}", "--admin", "${ADMIN_PORT}"]
env = { GREETING = "hi ${RIG_SERVICE} from ${OUTSIDE}" }
[services.store.ingresses.default]
protocol = "tcp"
[services.store.ingresses.admin]
protocol = "http"
[services.web]
command = ["web", "${STORE_URL}"]
[services.web.ingresses.main]
protocol = "http"
[services.web.egresses.store]
service = "store"
ingress = "admin"
[services.web.egresses.raw-store]
service = "store"
ingress = "default"
observe = false
"#;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn fixture() -> (Spec, Addresses) {
        let spec = spec::parse(SPEC, spec::Format::Toml, "shop.toml").expect("spec parses");
        let mut a = Addresses::default();
        for (s, i, p) in [
            ("store", "default", 7000),
            ("store", "admin", 7001),
            ("web", "main", 8000),
        ] {
            a.ingresses.insert((s.into(), i.into()), addr(p));
        }
        let proxied = WiredEdge {
            addr: addr(9000),
            target: addr(7001),
            observed: true,
        };
        let direct = WiredEdge {
            addr: addr(7000),
            target: addr(7000),
            observed: false,
        };
        a.edges.insert("web/store".into(), proxied);
        a.edges.insert("web/raw-store".into(), direct);
        (spec, a)
    }

    fn launch(name: &str) -> ServiceLaunch {
        let (spec, a) = fixture();
        let lookup = |k: &str| (k == "OUTSIDE").then(|| "rigd".to_string());
        service_env(&spec, &spec.services[name], &a, Path::new("/base"), lookup).expect("wires")
    }

    #[test]
    fn default_ingress_gets_host_and_port_others_are_prefixed() {
        let l = launch("store");
        assert_eq!(l.env["HOST"], "127.0.0.1");
        assert_eq!(l.env["PORT"], "7000");
        assert_eq!(l.env["ADMIN_HOST"], "127.0.0.1");
        assert_eq!(l.env["ADMIN_PORT"], "7001");
        assert!(!l.env.contains_key("DEFAULT_PORT"));
        assert_eq!(l.env["RIG_SERVICE"], "store");
        assert_eq!(l.env["RIG_ENV"], "shop");
        assert_eq!(l.cwd, PathBuf::from("/base"));
    }

    #[test]
    fn only_ingress_is_the_default_whatever_its_name() {
        let l = launch("web");
        assert_eq!(l.env["PORT"], "8000");
        assert!(!l.env.contains_key("MAIN_PORT"));
    }

    #[test]
    fn egresses_point_at_the_proxy_or_straight_at_the_target_when_not_observed() {
        let l = launch("web");
        assert_eq!(l.env["STORE_HOST"], "127.0.0.1");
        assert_eq!(l.env["STORE_PORT"], "9000");
        assert_eq!(l.env["STORE_ADDR"], "127.0.0.1:9000");
        assert_eq!(l.env["STORE_URL"], "http://127.0.0.1:9000");
        // `raw-store` is tcp (no URL) and not observed: wired to store's own port.
        assert_eq!(l.env["RAW_STORE_ADDR"], "127.0.0.1:7000");
        assert!(!l.env.contains_key("RAW_STORE_URL"));
    }

    #[test]
    fn vars_expand_in_command_and_env_with_the_outside_as_fallback() {
        let store = launch("store");
        assert_eq!(
            store.command,
            ["kv", "--listen", "127.0.0.1:7000", "--admin", "7001"]
        );
        assert_eq!(store.env["GREETING"], "hi store from rigd");
        assert_eq!(launch("web").command, ["web", "http://127.0.0.1:9000"]);
    }

    #[test]
    fn a_variable_named_in_its_own_value_is_rigds() {
        let src = r#"
name = "pass"
[services.app]
command = ["app", "${RIG_TOKEN}"]
env = { RIG_TOKEN = "${RIG_TOKEN}", WRAPPED = "<${WRAPPED}>" }
"#;
        let spec = spec::parse(src, spec::Format::Toml, "pass.toml").expect("spec parses");
        let outer = |k: &str| match k {
            "RIG_TOKEN" => Some("from-rigd".to_string()),
            "WRAPPED" => Some("w".to_string()),
            _ => None,
        };
        let l = service_env(
            &spec,
            &spec.services["app"],
            &Addresses::default(),
            Path::new("/"),
            outer,
        )
        .expect("wires");
        assert_eq!(l.env["RIG_TOKEN"], "from-rigd");
        assert_eq!(l.env["WRAPPED"], "<w>");
        assert_eq!(
            l.command,
            ["app", "from-rigd"],
            "the command sees the expanded value"
        );
    }

    #[test]
    fn an_unknown_var_is_an_error_naming_service_and_field() {
        let (spec, a) = fixture();
        let err = service_env(&spec, &spec.services["store"], &a, Path::new("/"), |_| None)
            .expect_err("OUTSIDE is unset");
        assert!(
            matches!(&err, WiringError::Expand { service, what, .. } if service == "store" && what == "env GREETING"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("service store: env GREETING: "),
            "{err}"
        );
    }

    #[test]
    fn a_missing_address_is_an_error_not_a_panic() {
        let (spec, mut a) = fixture();
        a.edges.remove("web/store");
        let err = service_env(&spec, &spec.services["web"], &a, Path::new("/"), |_| None)
            .expect_err("no edge address");
        assert_eq!(err.to_string(), "service web: no address for egress store");
    }

    #[test]
    fn rig_wiring_describes_ingresses_and_egresses_as_json() {
        let l = launch("web");
        let w: serde_json::Value = serde_json::from_str(&l.env["RIG_WIRING"]).expect("json");
        assert_eq!(w["env"], "shop");
        assert_eq!(w["service"], "web");
        assert_eq!(w["ingresses"]["main"]["port"], 8000);
        assert_eq!(w["ingresses"]["main"]["protocol"], "http");
        let store = &w["egresses"]["store"];
        assert_eq!(store["addr"], "127.0.0.1:9000");
        assert_eq!(store["url"], "http://127.0.0.1:9000");
        assert_eq!(store["observed"], true);
        assert_eq!(store["target"], "127.0.0.1:7001");
        assert_eq!(store["ingress"], "admin");
        let raw = &w["egresses"]["raw-store"];
        assert_eq!(raw["observed"], false);
        assert_eq!(raw["url"], serde_json::Value::Null);
        assert_eq!(raw["addr"], "127.0.0.1:7000");
    }
}
