//! Builds each fleet's providers from its config: `aws` (an Auto Scaling
//! group and a target group, through gru-aws) or `local` (what `gru dev`
//! runs). The binary ties the providers to the controller: gru-controller
//! knows only gru-cloud's traits.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gru_cloud::local::{LaunchSpec, LocalGroup, LocalLoadBalancer};
use tokio::net::TcpListener;

use gru_controller::FleetRuntime;
use gru_controller::config::{FleetConfig, ProviderConfig};

/// Time a local minion gets between SIGTERM and SIGKILL: enough to finish
/// the message in hand and flush its queue.
pub const LOCAL_STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("fleet {fleet}: cannot listen for the load balancer on {addr}")]
    Listen {
        fleet: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet {fleet}: cannot adopt the local minions of an earlier run")]
    LocalState {
        fleet: String,
        #[source]
        source: gru_cloud::local::StateFileError,
    },
    #[error("fleet {fleet}: invalid AWS settings")]
    Aws {
        fleet: String,
        #[source]
        source: gru_aws::ConnectError,
    },
    #[error("fleet {fleet}: invalid [fleet.sqs] settings")]
    Sqs {
        fleet: String,
        #[source]
        source: gru_cloud::aws::SqsSettingsError,
    },
}

/// A fleet's providers, with the local parts kept so `gru dev` can show the
/// load balancer's address and stop the minions on the way out.
pub struct BuiltFleet {
    pub runtime: FleetRuntime,
    pub local: Option<LocalParts>,
}

pub struct LocalParts {
    pub group: Arc<LocalGroup>,
    pub load_balancer: Arc<LocalLoadBalancer>,
}

/// The file in the controller's state directory where local fleets record
/// their minion processes, so a restarted controller adopts them.
pub const LOCAL_INSTANCES_FILE: &str = "local-instances.json";

/// Builds the providers of `fleet`. `program` is the `gru` binary the local
/// provider starts minions with (`gru minion --config … --instance-id …`).
///
/// Local minions, like EC2 instances, outlive their controller: they are
/// recorded in [`LOCAL_INSTANCES_FILE`] under `state_dir`, survive a
/// controller that is killed, and are adopted by the next one started on the
/// same state directory. A controller that stops gracefully stops them.
pub async fn build(
    fleet: &FleetConfig,
    program: &Path,
    state_dir: &Path,
) -> Result<BuiltFleet, ProviderError> {
    let mut built = build_providers(fleet, program, state_dir).await?;
    // `[fleet.sqs]`, with either provider: a local fleet may be woken by a
    // queue too (moto's, in the tests).
    if let Some(sqs) = &fleet.sqs {
        let signal =
            gru_aws::SqsSignal::connect(sqs)
                .await
                .map_err(|source| ProviderError::Sqs {
                    fleet: fleet.name.clone(),
                    source,
                })?;
        built.runtime = built.runtime.with_signal(Arc::new(signal));
    }
    Ok(built)
}

async fn build_providers(
    fleet: &FleetConfig,
    program: &Path,
    state_dir: &Path,
) -> Result<BuiltFleet, ProviderError> {
    match &fleet.provider {
        ProviderConfig::Local(local) => {
            let listener =
                TcpListener::bind(local.listen)
                    .await
                    .map_err(|source| ProviderError::Listen {
                        fleet: fleet.name.clone(),
                        addr: local.listen,
                        source,
                    })?;
            let load_balancer = LocalLoadBalancer::start(listener, local.deregistration_delay);
            let mut spec = LaunchSpec::new(program);
            spec.args = vec![
                OsString::from("minion"),
                OsString::from("--config"),
                local.minion_config.clone().into_os_string(),
            ];
            spec.log_dir = local.log_dir.clone();
            spec.stop_grace = LOCAL_STOP_GRACE;
            spec.state_file = Some(state_dir.join(LOCAL_INSTANCES_FILE));
            let b = fleet.bounds();
            // Like an Auto Scaling group's max, the local group needs room
            // above the fleet's max for minions still draining.
            let group =
                LocalGroup::try_start(&fleet.name, spec, 0, b.max.saturating_mul(2).max(1), b.min)
                    .map_err(|source| ProviderError::LocalState {
                        fleet: fleet.name.clone(),
                        source,
                    })?;
            Ok(BuiltFleet {
                runtime: FleetRuntime::new(fleet.clone(), group.clone(), load_balancer.clone()),
                local: Some(LocalParts {
                    group,
                    load_balancer,
                }),
            })
        }
        ProviderConfig::Aws(aws) => {
            // Builds the SDK clients only: the first AWS call is the fleet's
            // first reconcile pass, whose failures are events, not a refusal
            // to start.
            let connected = gru_aws::connect(aws.fleet.clone())
                .await
                .map_err(|source| ProviderError::Aws {
                    fleet: fleet.name.clone(),
                    source,
                })?;
            Ok(BuiltFleet {
                runtime: FleetRuntime::with_hooks(fleet.clone(), Arc::new(connected)),
                local: None,
            })
        }
    }
}
