//! The `rig.v1` gRPC services. Each RPC converts its request into domain types first, then acts;
//! `tonic::Status` appears only here.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use rig_proto::v1 as pb;
use rig_proto::v1::chaos_server::Chaos;
use rig_proto::v1::environments_server::Environments;
use rig_proto::v1::events_server::Events;
use rig_proxy::policy::ChaosSpec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Shared;
use crate::eventlog::{Filter, Followed, unix_secs};
use crate::registry::view::{
    EdgeChaos, EnvState, EnvView, Selector, ServiceState, SpecSource, UpStep,
};
use crate::registry::{ErrorKind, RegistryError};
use crate::spec;

/// A registry error as a gRPC status: the code from its kind, the message as it is.
impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let code = match e.kind() {
            ErrorKind::Invalid => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::Internal => tonic::Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

fn spec_source(req: pb::UpRequest) -> Result<SpecSource, Status> {
    let format = match req.format.as_str() {
        "toml" | "" => spec::Format::Toml,
        "json" => spec::Format::Json,
        other => return Err(RegistryError::UnknownFormat(other.to_string()).into()),
    };
    let origin = if req.origin.is_empty() {
        "spec".to_string()
    } else {
        req.origin
    };
    let base_dir = if req.base_dir.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| ".".into())
    } else {
        req.base_dir.into()
    };
    Ok(SpecSource {
        text: req.spec,
        format,
        origin,
        base_dir,
    })
}

fn step_pb(s: UpStep) -> pb::UpProgress {
    pb::UpProgress {
        env: s.env,
        service: s.service,
        state: s.state.to_string(),
        message: s.message,
        last_logs: s.last_logs,
        environment: s.environment.as_ref().map(env_pb),
    }
}

pub(crate) fn env_pb(v: &EnvView) -> pb::EnvironmentStatus {
    pb::EnvironmentStatus {
        name: v.name.clone(),
        state: env_state(v.state) as i32,
        origin: v.origin.clone(),
        started_at: unix_secs(v.started_at),
        services: v
            .services
            .iter()
            .map(|s| pb::ServiceStatus {
                name: s.name.clone(),
                state: service_state(s.state) as i32,
                pid: s.pid.unwrap_or(0),
                ingresses: s
                    .ingresses
                    .iter()
                    .map(|i| pb::IngressStatus {
                        name: i.name.clone(),
                        protocol: i.protocol.to_string(),
                        address: i.address.to_string(),
                    })
                    .collect(),
                exit: s.exit.clone().unwrap_or_default(),
                command: s.command.clone(),
            })
            .collect(),
        edges: v
            .edges
            .iter()
            .map(|e| pb::EdgeStatus {
                edge: e.edge.clone(),
                source: e.source.clone(),
                egress: e.egress.clone(),
                target: e.target.clone(),
                ingress: e.ingress.clone(),
                protocol: e.protocol.to_string(),
                proxy_address: e.wired_address.to_string(),
                target_address: e.target_address.to_string(),
                observed: e.observed,
                chaos_version: e.chaos.version,
                chaos: Some(pb::ChaosSpec::from(&e.chaos.spec)),
            })
            .collect(),
    }
}

fn env_state(s: EnvState) -> pb::EnvironmentState {
    match s {
        EnvState::Starting => pb::EnvironmentState::Starting,
        EnvState::Up => pb::EnvironmentState::Up,
        EnvState::Degraded => pb::EnvironmentState::Degraded,
        EnvState::Stopping => pb::EnvironmentState::Stopping,
    }
}

fn service_state(s: ServiceState) -> pb::ServiceState {
    match s {
        ServiceState::Pending => pb::ServiceState::Pending,
        ServiceState::Starting => pb::ServiceState::Starting,
        ServiceState::Ready => pb::ServiceState::Ready,
        ServiceState::Failed => pb::ServiceState::Failed,
        ServiceState::Exited => pb::ServiceState::Exited,
        ServiceState::Stopped => pb::ServiceState::Stopped,
    }
}

fn chaos_pb(edges: Vec<EdgeChaos>) -> pb::ChaosResponse {
    pb::ChaosResponse {
        edges: edges
            .iter()
            .map(|c| pb::EdgeChaos {
                env: c.env.clone(),
                edge: c.edge.clone(),
                protocol: c.protocol.to_string(),
                version: c.version,
                chaos: Some(pb::ChaosSpec::from(&c.spec)),
            })
            .collect(),
    }
}

/// The longest `origin` and `base_dir` an `Up` may name (Linux's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;
/// The longest edge pattern: `SOURCE/EGRESS`, two names and a slash.
const MAX_EDGE_LEN: usize = 2 * spec::MAX_NAME_LEN + 1;
/// The most edge patterns one selector, or event type prefixes one `Watch`, may list: each is
/// matched against every edge or event, so their number is bounded like their length.
const MAX_LIST_ITEMS: usize = 256;
/// The longest event type prefix (`request.completed` is 17 bytes).
const MAX_TYPE_LEN: usize = 64;

fn list_len(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_LIST_ITEMS {
        return Err(Status::invalid_argument(format!(
            "{field}: {n} items: at most {MAX_LIST_ITEMS}"
        )));
    }
    Ok(())
}

/// A name field of a request, refused (InvalidArgument naming `field`) before it reaches the
/// registry when it is longer than any name a spec can declare.
fn name_field(field: &str, kind: &str, v: &str) -> Result<(), Status> {
    spec::check_name_len(kind, v).map_err(|m| Status::invalid_argument(format!("{field}: {m}")))
}

fn selector_fields(sel: &pb::EdgeSelector) -> Result<(), Status> {
    name_field("selector.env", "environment", &sel.env)?;
    name_field("selector.to", "service", &sel.to)?;
    list_len("selector.edges", sel.edges.len())?;
    for (i, e) in sel.edges.iter().enumerate() {
        if e.len() > MAX_EDGE_LEN {
            return Err(Status::invalid_argument(format!(
                "selector.edges[{i}]: edge {} is {} bytes long: at most {MAX_EDGE_LEN}",
                spec::preview(e),
                e.len()
            )));
        }
    }
    Ok(())
}

fn up_fields(req: &pb::UpRequest) -> Result<(), Status> {
    if req.spec.len() as u64 > spec::MAX_SPEC_BYTES {
        return Err(Status::invalid_argument(format!(
            "spec: {} bytes, over rig's limit of {} bytes (1 MiB)",
            req.spec.len(),
            spec::MAX_SPEC_BYTES
        )));
    }
    for (field, v) in [("origin", &req.origin), ("base_dir", &req.base_dir)] {
        if v.len() > MAX_PATH_BYTES {
            return Err(Status::invalid_argument(format!(
                "{field}: {} bytes long: at most {MAX_PATH_BYTES}",
                v.len()
            )));
        }
    }
    Ok(())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The three services share one state.
#[derive(Debug, Clone)]
pub struct Api {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Environments for Api {
    type UpStream = BoxStream<pb::UpProgress>;

    async fn up(&self, req: Request<pb::UpRequest>) -> Result<Response<Self::UpStream>, Status> {
        let req = req.into_inner();
        up_fields(&req)?;
        let src = spec_source(req)?;
        let (tx, rx) = mpsc::channel(64);
        let (step_tx, mut steps) = mpsc::channel::<UpStep>(64);
        let shared = self.shared.clone();
        // The environment is brought up in its own task: a client that goes away mid-way does
        // not leave it half-started.
        let up = tokio::spawn(async move { shared.envs.up(src, step_tx).await.map(|_| ()) });
        tokio::spawn(async move {
            // Every step first (the channel closes when `up` is done), then its error if any.
            while let Some(step) = steps.recv().await {
                let _ = tx.send(Ok(step_pb(step))).await;
            }
            let result = match up.await {
                Ok(r) => r.map_err(Status::from),
                Err(e) => Err(RegistryError::Task(e.to_string()).into()),
            };
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn down(
        &self,
        req: Request<pb::DownRequest>,
    ) -> Result<Response<pb::DownResponse>, Status> {
        name_field("env", "environment", &req.get_ref().env)?;
        let (env, stopped) = self.shared.envs.down(&req.get_ref().env).await?;
        Ok(Response::new(pb::DownResponse { env, stopped }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let environments = self
            .shared
            .envs
            .list()
            .await
            .iter()
            .map(|e| env_pb(&e.status()))
            .collect();
        Ok(Response::new(pb::ListResponse { environments }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::EnvironmentStatus>, Status> {
        name_field("env", "environment", &req.get_ref().env)?;
        let env = self.shared.envs.get(&req.get_ref().env).await?;
        Ok(Response::new(env_pb(&env.status())))
    }
}

fn selector(s: Option<pb::EdgeSelector>) -> Result<Selector, Status> {
    let sel = s.unwrap_or_default();
    selector_fields(&sel)?;
    Ok(Selector {
        env: sel.env,
        edges: sel.edges,
        to: sel.to,
    })
}

#[tonic::async_trait]
impl Chaos for Api {
    async fn set(
        &self,
        req: Request<pb::SetChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        let req = req.into_inner();
        let sel = selector(req.selector)?;
        let spec = ChaosSpec::try_from(req.chaos.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if spec.is_empty() {
            return Err(Status::invalid_argument(
                "chaos: nothing to set (no field given); use Clear to remove chaos",
            ));
        }
        let env = self.shared.envs.get(&sel.env).await?;
        let edges = env.set_chaos(&sel, "set", |_| spec.clone())?;
        Ok(Response::new(chaos_pb(edges)))
    }

    async fn get(
        &self,
        req: Request<pb::GetChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        let sel = selector(req.into_inner().selector)?;
        let env = self.shared.envs.get(&sel.env).await?;
        Ok(Response::new(chaos_pb(env.get_chaos(&sel)?)))
    }

    async fn clear(
        &self,
        req: Request<pb::ClearChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        let sel = selector(req.into_inner().selector)?;
        let env = self.shared.envs.get(&sel.env).await?;
        let edges = env.set_chaos(&sel, "clear", |_| ChaosSpec::default())?;
        Ok(Response::new(chaos_pb(edges)))
    }

    async fn list_presets(
        &self,
        _req: Request<pb::ListPresetsRequest>,
    ) -> Result<Response<pb::ListPresetsResponse>, Status> {
        let presets = self
            .shared
            .presets
            .iter()
            .map(|p| pb::Preset {
                name: p.name.clone(),
                description: p.description.clone(),
                chaos: Some(pb::ChaosSpec::from(&p.chaos)),
                http: Some(pb::ChaosSpec::from(&p.http)),
                grpc: Some(pb::ChaosSpec::from(&p.grpc)),
                tcp: Some(pb::ChaosSpec::from(&p.tcp)),
            })
            .collect();
        Ok(Response::new(pb::ListPresetsResponse { presets }))
    }

    async fn apply_preset(
        &self,
        req: Request<pb::ApplyPresetRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        let req = req.into_inner();
        let sel = selector(req.selector)?;
        // Preset names come from file names: at most NAME_MAX.
        if req.preset.len() > 255 {
            return Err(Status::invalid_argument(format!(
                "preset: preset name {} is {} bytes long: at most 255",
                spec::preview(&req.preset),
                req.preset.len()
            )));
        }
        let preset = self
            .shared
            .presets
            .iter()
            .find(|p| p.name == req.preset)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .shared
                    .presets
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                Status::not_found(format!(
                    "no preset named {:?} (presets: {})",
                    req.preset,
                    names.join(", ")
                ))
            })?
            .clone();
        let env = self.shared.envs.get(&sel.env).await?;
        let cause = format!("preset {}", preset.name);
        let edges = env.set_chaos(&sel, &cause, |p| preset.for_protocol(p))?;
        Ok(Response::new(chaos_pb(edges)))
    }
}

#[tonic::async_trait]
impl Events for Api {
    type WatchStream = BoxStream<pb::Event>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        name_field("env", "environment", &req.env)?;
        name_field("service", "service", &req.service)?;
        list_len("types", req.types.len())?;
        for (i, t) in req.types.iter().enumerate() {
            if t.len() > MAX_TYPE_LEN {
                return Err(Status::invalid_argument(format!(
                    "types[{i}]: event type {} is {} bytes long: at most {MAX_TYPE_LEN}",
                    spec::preview(t),
                    t.len()
                )));
            }
        }
        if req.edge.len() > MAX_EDGE_LEN {
            return Err(Status::invalid_argument(format!(
                "edge: {} is {} bytes long: at most {MAX_EDGE_LEN}",
                spec::preview(&req.edge),
                req.edge.len()
            )));
        }
        let filter = Filter {
            types: req.types,
            env: req.env,
            service: req.service,
            edge: req.edge,
        };
        let after = if req.only_new {
            self.shared.log.last_seq()
        } else {
            req.after_seq
        };
        let rx = self
            .shared
            .log
            .follow(after, filter, req.follow, self.shared.shutdown.clone());
        let stream = ReceiverStream::new(rx).map(|item| {
            Ok(match item {
                Followed::Event(e) => e.to_pb(),
                Followed::Lagged {
                    missed,
                    resume_after,
                } => crate::eventlog::Event {
                    seq: 0,
                    time: std::time::SystemTime::now(),
                    env: String::new(),
                    service: String::new(),
                    edge: String::new(),
                    data: crate::events::EventData::EventsLagged {
                        missed,
                        resume_after: Some(resume_after),
                    },
                }
                .to_pb(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
