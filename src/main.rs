//! The `switchyard` command: parses arguments and hands over to serve, check or keys.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::ledger::report::{self, Format};
use switchyard::ledger::store::{GroupBy, Store};
use switchyard::telemetry::{init_logging, LogFormat};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "An OpenAI-compatible inference gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file; else $SWITCHYARD_CONFIG, else ./routes.yaml.
        #[arg(long, env = "SWITCHYARD_CONFIG", default_value = "routes.yaml")]
        config: PathBuf,
        /// Listen address, overriding `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Write the bound address (host:port) to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config and print the routes it would serve.
    Check {
        #[arg(long, env = "SWITCHYARD_CONFIG", default_value = "routes.yaml")]
        config: PathBuf,
    },
    /// Spend report from the ledger.
    Spend {
        #[arg(long, env = "SWITCHYARD_CONFIG", default_value = "routes.yaml")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = GroupBy::Key)]
        by: GroupBy,
        /// From (inclusive): 2026-11-01, 2026-11-01T12:00:00Z, a Unix time, or 24h / 7d ago.
        #[arg(long)]
        since: Option<String>,
        /// Until (exclusive), same forms.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Client keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random client key and the `keys:` entry for routes.yaml.
    Generate {
        #[arg(long, default_value = "my-app")]
        name: String,
    },
}

/// The commands that print (`check | head`, `spend | less` closed early) end quietly when
/// their reader goes away, as Unix tools do, instead of panicking on the write. Set once
/// their database work is done (a socket write to a database gone would end them as
/// silently), and never for `serve`, whose sockets must see a closed peer as an error.
fn quiet_when_the_reader_leaves() {
    // SAFETY: SIG_DFL is a valid disposition; nothing else in the process handles SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Check { .. } | Command::Keys { .. }) {
        quiet_when_the_reader_leaves();
    }
    if matches!(cli.command, Command::Serve { .. }) {
        // A SIGHUP asks for a reload; its default action would end the process. Ignored
        // from here until `serve` listens for it (its first step), so one sent at start
        // does not.
        // SAFETY: SIG_IGN is a valid disposition; no thread is running yet.
        unsafe {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        }
    }
    match cli.command {
        Command::Serve {
            config,
            listen,
            ready_file,
            log_format,
        } => {
            let _flush_logs_at_exit = init_logging(log_format);
            // One core (a pinned process, a container's CPU quota): the request work runs on
            // the thread that drives the sockets, with no worker to hand it to and no queue
            // shared between threads. More cores: a worker per core.
            let mut builder = if std::thread::available_parallelism().map_or(1, |n| n.get()) == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            };
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = switchyard::server::ServeOptions {
                config_path: config,
                listen,
                ready_file,
            };
            match runtime.block_on(switchyard::server::serve(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => check(&config),
        Command::Spend {
            config,
            by,
            since,
            until,
            format,
        } => spend(&config, by, since, until, format),
        Command::Keys {
            command: KeysCommand::Generate { name },
        } => {
            if name.trim().is_empty() {
                eprintln!("--name must not be empty: a key needs a name in routes.yaml");
                return ExitCode::from(2);
            }
            let (key, hash) = switchyard::auth::generate_key();
            println!("key (give this to the client; it is shown only once):\n  {key}\n");
            // Bare when YAML reads it back as that string; else quoted (JSON's quoting is
            // YAML's): `123`, `true`, `a: b`, `#x` or an empty name would read as something else.
            let plain = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                && !matches!(
                    name.to_ascii_lowercase().as_str(),
                    "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
                );
            let name = if plain {
                name
            } else {
                serde_json::to_string(&name).unwrap_or_default()
            };
            println!("routes.yaml entry:\n  keys:\n    - {{ name: {name}, key: \"{hash}\" }}");
            ExitCode::SUCCESS
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match switchyard::config::load_file(path) {
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} error(s); the config was not accepted",
                path.display(),
                e.errors.len()
            );
            ExitCode::FAILURE
        }
        Ok(loaded) => {
            for w in loaded.warning_lines() {
                eprintln!("{w}");
            }
            let c = &loaded.config;
            println!("{}: ok", path.display());
            println!("routes ({}):", c.models.len());
            for (name, r) in &c.models {
                let strategy = serde_json::to_value(r.strategy)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                println!("  {name}  [{strategy}]");
                for d in &r.deployments {
                    let kind = c
                        .providers
                        .get(&d.provider)
                        .map(|p| p.kind())
                        .unwrap_or("?");
                    let upstream = d.deployment.as_deref().unwrap_or(name);
                    println!(
                        "    -> {}/{} ({kind}, weight {}, priority {})",
                        d.provider, upstream, d.weight, d.priority
                    );
                }
                if !r.fallbacks.is_empty() {
                    println!("    fallbacks: {}", r.fallbacks.join(", "));
                }
            }
            println!(
                "keys: {}{}",
                c.keys.len(),
                if c.keys.is_empty() {
                    " (no client authentication!)"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
    }
}

fn spend(
    config: &std::path::Path,
    by: GroupBy,
    since: Option<String>,
    until: Option<String>,
    format: Format,
) -> ExitCode {
    let loaded = match switchyard::config::load_file(config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let now = switchyard::ledger::now_ms();
    let window = (|| -> Result<(i64, i64), String> {
        let since = since
            .as_deref()
            .map(|s| report::parse_time(s, now))
            .transpose()?;
        let until = until
            .as_deref()
            .map(|s| report::parse_time(s, now))
            .transpose()?;
        Ok((since.unwrap_or(0), until.unwrap_or(i64::MAX)))
    })();
    let (since, until) = match window {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let url = switchyard::server::ledger_url(&loaded);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A database that stops answering once connected would hold the command for ever.
    const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
    let result = runtime.block_on(async {
        tokio::time::timeout(REPORT_TIMEOUT, async {
            let store = Store::open_read_only(&url).await?;
            let lines = report::report(&store, by, since, until).await;
            store.close().await;
            lines
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the ledger did not answer within {} s",
                REPORT_TIMEOUT.as_secs()
            ))
        })
    });
    match result {
        Ok(lines) => {
            quiet_when_the_reader_leaves();
            print!("{}", report::render(&lines, by, format));
            if format == Format::Json {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
