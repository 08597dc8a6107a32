//! `nn-gateway`: parses arguments, sets up logging, loads the configuration and hands over to
//! [`nn_gateway::daemon::run`] or an operator command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

use nn_gateway::config::{Config, LogConfig, LogFormat, Source};
use nn_gateway::{cli, daemon, notify::Notifier};

#[derive(Parser)]
#[command(
    name = "nn-gateway",
    version,
    about = "NetNeural site gateway",
    after_help = "Every configuration key can be set from the environment: NNGW_<SECTION>__<KEY>, \
                  e.g. NNGW_MQTT__PORT=18830 or NNGW_STORAGE__PATH=/var/lib/nn-gateway/gateway.db \
                  (see config/gateway.toml)."
)]
struct Args {
    /// Configuration file (TOML). Without it the embedded default (config/gateway.toml) is used.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run,
    /// Print the effective configuration (secrets left out; it loads again as a config), or the first problem in it.
    CheckConfig,
    /// Counts: devices, telemetry, outbox per cloud and state, rejected, database size.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Each device with its reported and desired documents.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The newest rejected messages and why they were refused.
    Rejected {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How many of the newest to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A device's telemetry points, newest first.
    Telemetry {
        /// The device key (see `nn-gateway devices`).
        device: String,
        /// Only points received since: a duration back from now ("1h", "30m") or an RFC 3339
        /// time.
        #[arg(long)]
        since: Option<String>,
        /// How many points at most.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What is owed to each cloud: telemetry backlog, rows in flight, dead and pending.
    Queue {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How many rows to list at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(subcommand)]
        action: Option<QueueAction>,
    },
    /// Desired state (the local operator's edits).
    Desired {
        #[command(subcommand)]
        action: DesiredAction,
    },
    /// Fields changed in the mirror and in a cloud to different values: the pending ones, or
    /// all with --all.
    Conflicts {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Resolved and auto-resolved ones too.
        #[arg(long)]
        all: bool,
        /// How many to list at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(subcommand)]
        action: Option<ConflictAction>,
    },
    /// Reconciliation with the clouds.
    Sync {
        #[command(subcommand)]
        action: SyncAction,
    },
    /// The sync log: each run with changes and its operations, newest first.
    SyncLog {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How many rows at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only rows of this cloud (golioth, netneural; "mirror" for what the mirror took).
        #[arg(long)]
        cloud: Option<String>,
        /// Only rows with this outcome (completed, partial, failed).
        #[arg(long)]
        outcome: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConflictAction {
    /// One conflict: local, remote and base values, when each side changed, how it ended.
    Show {
        /// The conflict id shown by `nn-gateway conflicts`.
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Settle a pending conflict; the daemon then writes the value everywhere the field lives.
    Resolve {
        /// The conflict id shown by `nn-gateway conflicts`.
        id: i64,
        /// Which side's value wins.
        #[arg(long = "use", value_parser = ["local", "remote"], conflicts_with = "value",
              required_unless_present = "value")]
        use_side: Option<String>,
        /// A value of your own, as JSON (e.g. '"on"', '30', '{"a":1}'; null removes the field).
        #[arg(long)]
        value: Option<String>,
    },
}

#[derive(Subcommand)]
enum SyncAction {
    /// Ask the running daemon for a sync run now (SIGUSR1) and wait for its result.
    Now {
        /// How long to wait for the run to finish.
        #[arg(long, default_value = "60s")]
        wait: humantime::Duration,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Send a dead row again (by id), or every dead row and dead-lettered telemetry point.
    Retry {
        /// The outbox row id shown by `nn-gateway queue` (dead telemetry points, shown as
        /// `p<id>`, go back with --all-dead).
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<i64>,
        #[arg(long)]
        all_dead: bool,
    },
}

#[derive(Subcommand)]
enum DesiredAction {
    /// Replace a device's desired document; the running daemon publishes it to the device.
    Set {
        /// The device key, as in its MQTT topic or CoAP path (see `nn-gateway devices`).
        device: String,
        /// The whole desired document, a JSON object, e.g. '{"led":"on"}'.
        json: String,
        /// Create the device if the gateway does not know it yet.
        #[arg(long)]
        create: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nn-gateway: {e:#}");
            // A configuration error gets its own status, which the unit names in
            // RestartPreventExitStatus=: one clear journal line instead of a restart loop.
            let config = e
                .downcast_ref::<nn_gateway::config::ConfigError>()
                .is_some()
                || matches!(
                    e.downcast_ref::<daemon::DaemonError>(),
                    Some(daemon::DaemonError::Config(_))
                )
                // A cloud client that cannot be built (no CA certificates on the machine):
                // a restart cannot fix that either.
                || matches!(
                    e.downcast_ref::<daemon::DaemonError>(),
                    Some(daemon::DaemonError::Cloud(c)) if c.request == nn_gateway::cloud::CLIENT_SET_UP
                );
            if config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Exit status of a configuration error (`EX_CONFIG` from sysexits.h), named in the unit's
/// `RestartPreventExitStatus=`.
const EXIT_CONFIG: u8 = 78;

fn source(args: &Args) -> Source {
    args.config.clone().map_or(Source::Embedded, Source::File)
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let source = source(&args);
    let config = Config::load(&source)?;
    // Operator commands look for the daemon's database where the daemon would have put it.
    let db = cli::locate_database(&config.storage.path, cli::STATE_DIRECTORIES);
    let out = match args.command {
        Command::Run => return run_daemon(config, source),
        Command::CheckConfig => {
            format!(
                "# effective configuration from {} (+ NNGW_ environment)\n{}",
                source.name(),
                config.to_toml()
            )
        }
        Command::Status { json } => cli::status(&db, json)?,
        Command::Devices { json } => cli::devices(&db, json)?,
        Command::Rejected { json, limit } => cli::rejected(&db, limit, json)?,
        Command::Telemetry {
            device,
            since,
            limit,
            json,
        } => {
            let since = since
                .map(|s| cli::parse_since(&s, nn_gateway::model::UnixMillis::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            cli::telemetry(&db, &device, since, limit, json)?
        }
        Command::Queue {
            json,
            limit,
            action: None,
        } => cli::queue(&db, limit, json)?,
        Command::Queue {
            action: Some(QueueAction::Retry { id, all_dead }),
            ..
        } => {
            let which = match id {
                Some(id) if !all_dead => nn_gateway::store::Requeue::Row(id),
                _ => nn_gateway::store::Requeue::AllDead,
            };
            cli::queue_retry(&db, which)?
        }
        Command::Desired {
            action:
                DesiredAction::Set {
                    device,
                    json,
                    create,
                },
        } => cli::set_desired(&db, &device, &json, create)?,
        Command::Conflicts {
            json,
            all,
            limit,
            action: None,
        } => cli::conflicts(&db, all, limit, json)?,
        Command::Conflicts {
            action: Some(ConflictAction::Show { id, json }),
            ..
        } => cli::conflict(&db, id, json)?,
        Command::Conflicts {
            action:
                Some(ConflictAction::Resolve {
                    id,
                    use_side,
                    value,
                }),
            ..
        } => cli::resolve(&db, id, use_side.as_deref(), value.as_deref())?,
        Command::Sync {
            action: SyncAction::Now { wait },
        } => cli::sync_now(&db, wait.into())?,
        Command::SyncLog {
            json,
            limit,
            cloud,
            outcome,
        } => cli::sync_log(&db, cloud.as_deref(), outcome.as_deref(), limit, json)?,
    };
    print!("{out}");
    Ok(())
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Journald when asked, or when stderr is the journal (`JOURNAL_STREAM`, set by systemd).
fn init_tracing(log: &LogConfig) -> anyhow::Result<FilterHandle> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .with_context(|| {
            format!(
                "configuration: key `log.level` = {:?} is not a valid filter",
                log.level
            )
        })?;
    let (filter, handle) = reload::Layer::new(filter);
    let journald = match log.format {
        LogFormat::Journald => true,
        LogFormat::Text => false,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if journald {
        let layer = tracing_journald::layer()
            .context("cannot connect to the journal (log.format = journald)")?;
        registry.with(layer).init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour only for a person at a terminal, not in a file, pipe or journal.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    Ok(handle)
}

fn run_daemon(config: Config, source: Source) -> anyhow::Result<()> {
    // Before binding anything: a second daemon on the same database is refused for what it
    // is (the store's lock, taken at open, still decides), not for an address in use.
    if let Some(pid) = nn_gateway::store::running_daemon_pid(&config.storage.path) {
        anyhow::bail!(
            "{}: another nn-gateway (pid {pid}) is running on this database; stop it first",
            config.storage.path.display()
        );
    }
    let filter = init_tracing(&config.log)?;
    let notifier = Notifier::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let sockets = daemon::Sockets::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let (reload_tx, reloads) = tokio::sync::watch::channel(config.clone());
        tokio::spawn(signals(
            shutdown.clone(),
            source,
            config.clone(),
            filter,
            notifier.clone(),
            reload_tx,
        ));
        daemon::run_reloadable(config, sockets, shutdown, notifier, reloads).await?;
        Ok(())
    })
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP re-reads the configuration, applies what can
/// change while running (the log filter, the clouds' API key files) and names the keys that
/// need a restart.
async fn signals(
    shutdown: CancellationToken,
    source: Source,
    mut current: Config,
    filter: FilterHandle,
    notifier: Notifier,
    reloads: tokio::sync::watch::Sender<Config>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("SIGINT"); break; }
            _ = hup.recv() => {
                notifier.reloading();
                match Config::load(&source) {
                    Ok(new) => {
                        let applied = EnvFilter::try_new(&new.log.level).ok().is_some_and(|f| filter.reload(f).is_ok());
                        if applied {
                            tracing::info!(level = %new.log.level, "log filter reloaded");
                        } else {
                            tracing::warn!(level = %new.log.level, "log.level not applied: invalid filter");
                        }
                        let pending = current.restart_needed(&new);
                        // Key files are re-read by the load above; the lanes take the keys.
                        let _ = reloads.send(new.clone());
                        if pending.is_empty() {
                            tracing::info!("configuration reloaded");
                        } else {
                            tracing::warn!(keys = %pending.join(", "), "configuration reloaded; these changes take effect after a restart");
                        }
                        current.log = new.log;
                    }
                    Err(e) => tracing::error!(error = %e, "configuration not reloaded; keeping the running one"),
                }
                notifier.ready();
            }
        }
    }
    shutdown.cancel();
}
