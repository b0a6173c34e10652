//! The `gru` binary: parses arguments, installs tracing, and hands over to a
//! library function (the controller, the minion agent, `gru dev`) or to a
//! small admin client. Start at [`Command`].

mod admin;
mod bench;
mod cert;
mod chart;
mod client;
mod cloud_init;
mod config_files;
mod dev;
mod providers;
mod sim;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit code for a configuration that cannot work (EX_CONFIG is 78; 64 is
/// EX_USAGE, as linkerd uses for invalid configuration).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "gru",
    version,
    about = "Autoscale fleets of engine instances, and drain each one before it is terminated",
    long_about = "gru sizes fleets of engine instances (\"minions\") on queue depth, and before any \
minion is terminated takes it out of the load balancer and drains it, so no message is lost.\n\n\
Try it on one machine:  gru dev   (then, in another terminal: gru fleet ls)"
)]
struct Cli {
    /// Log format for the service commands.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller service (`gru controller --config F`), or ask every
    /// configured controller which one leads (`gru controller status`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Controller {
        #[command(flatten)]
        service: ControllerArgs,
        #[command(subcommand)]
        command: Option<ControllerCommand>,
    },
    /// Run the minion agent (`gru minion --config F`), or list and inspect minions.
    #[command(args_conflicts_with_subcommands = true)]
    Minion {
        #[command(flatten)]
        agent: MinionAgentArgs,
        #[command(subcommand)]
        command: Option<MinionCommand>,
    },
    /// Run everything on this machine: controller, a local fleet of minion
    /// processes behind a TCP load balancer, and a sink. No cloud account.
    Dev(dev::DevArgs),
    /// Fleets.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Pin a fleet's size (`gru scale local 4`), or hand it back to the policy (`gru scale local auto`).
    Scale(admin::ScaleArgs),
    /// Take one minion out of service: out of the load balancer, drained, terminated.
    Drain(admin::DrainArgs),
    /// Stop applying a fleet's scaling decisions (they are still computed and shown).
    Pause(admin::FleetArg),
    /// Apply a paused fleet's scaling decisions again.
    Resume(admin::FleetArg),
    /// Show the controller's recent events, or follow them with -f.
    Events(admin::EventsArgs),
    /// Why a fleet has the size it has: the latest decision, explained.
    Explain(admin::FleetArg),
    /// Who your client certificate is to the controller: its identity, role
    /// and the calls it may make.
    Whoami(admin::WhoamiArgs),
    /// Admin certificates from the controller's CA (`gru cert issue --help`).
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Replay a traffic trace against a fleet's policy on a virtual clock, offline.
    Sim {
        #[command(subcommand)]
        command: sim::SimCommand,
    },
    /// HL7/MLLP load: a DRIVER that sends and a SINK that receives.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Minion user-data for cloud-init (`gru cloud-init render --help`).
    CloudInit {
        #[command(subcommand)]
        command: cloud_init::CloudInitCommand,
    },
}

#[derive(Args)]
struct ControllerArgs {
    /// The controller's TOML config.
    #[arg(long, short, env = "GRU_CONTROLLER_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Check the config, print every problem found, and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
struct MinionAgentArgs {
    /// The agent's TOML config.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This instance's id as the capacity group knows it (the local provider
    /// passes it; on AWS it comes from the instance metadata).
    #[arg(long, env = "GRU_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Check the config and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Subcommand)]
enum ControllerCommand {
    /// Which controller leads: every configured controller is asked, one row each.
    Status(admin::ControllerStatusArgs),
}

#[derive(Subcommand)]
enum MinionCommand {
    /// List minions.
    Ls(admin::MinionLsArgs),
    /// Show one minion and its history.
    Get(admin::MinionGetArgs),
    /// Let an instance join with its identity document again (admin role).
    Forget(admin::MinionForgetArgs),
}

#[derive(Subcommand)]
enum FleetCommand {
    /// List fleets with their size, load and latest decision.
    Ls(admin::FleetLsArgs),
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal, and never with NO_COLOR set (no-color.org):
    // logs written to a file or a pipe stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Controller {
            service,
            command: None,
        } => {
            // clap insists on --config here; this only keeps the type honest.
            let Some(config) = service.config else {
                eprintln!("invalid configuration: `gru controller` needs --config FILE");
                return ExitCode::from(EXIT_CONFIG);
            };
            init_tracing(cli.log_format);
            return dev::run_controller(&config, service.check_config).await;
        }
        Command::Controller {
            command: Some(ControllerCommand::Status(a)),
            ..
        } => admin::controller_status(a).await,
        Command::Minion {
            agent,
            command: None,
        } => {
            init_tracing(cli.log_format);
            return dev::run_minion(agent.config, agent.instance_id, agent.check_config).await;
        }
        Command::Dev(args) => {
            init_tracing(cli.log_format);
            return dev::run(args).await;
        }
        Command::Minion {
            command: Some(MinionCommand::Ls(a)),
            ..
        } => admin::minion_ls(a).await,
        Command::Minion {
            command: Some(MinionCommand::Get(a)),
            ..
        } => admin::minion_get(a).await,
        Command::Minion {
            command: Some(MinionCommand::Forget(a)),
            ..
        } => admin::minion_forget(a).await,
        Command::Fleet {
            command: FleetCommand::Ls(a),
        } => admin::fleet_ls(a).await,
        Command::Scale(a) => admin::scale(a).await,
        Command::Drain(a) => admin::drain(a).await,
        Command::Pause(a) => admin::pause(a, true).await,
        Command::Resume(a) => admin::pause(a, false).await,
        Command::Events(a) => admin::events(a).await,
        Command::Explain(a) => admin::explain(a).await,
        Command::Whoami(a) => admin::whoami(a).await,
        Command::Cert { command } => cert::run(command),
        Command::Sim { command } => sim::run(command),
        Command::Bench { command } => bench::run(command).await,
        Command::CloudInit { command } => cloud_init::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
