//! The `baton` command: `baton` runs the sidecar; `baton demo` runs it in front of its
//! own demo upstreams.

/// jemalloc: fast across threads, and able to return freed memory to the kernel.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Purge freed pages after about a second (a background thread does it, so an idle
/// process shrinks too): parked idle connections give their buffers back for real.
/// `_RJEM_MALLOC_CONF` in the environment overrides this.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use baton::{
    app,
    config::{Config, ConfigError, Env, LogFormat, Overlay, Strings},
    demo, init,
};
use std::process::ExitCode;
use tracing_subscriber::{fmt, EnvFilter};

const USAGE: &str = "usage: baton [demo | init [--dry-run | --cleanup] | version | help]

  baton          run the sidecar, configured by BATON_* environment variables
  baton init     install the TPROXY capture rules of this network namespace
                 (--dry-run: print them; --cleanup: remove them)
  baton demo     run the sidecar in front of two demo upstreams on 127.0.0.1
                 (then: curl http://127.0.0.1:15006/)
  baton version  print the version
";

/// Holds SIGTERM, SIGINT and SIGHUP from the very start of the process, before `main`
/// and before any thread exists (threads inherit the mask): one that arrives during the
/// sidecar's startup stays pending until app::run has installed its handlers, instead of
/// killing the process. `init` releases them at once and runs with the default actions.
#[used]
#[link_section = ".init_array"]
static HOLD_SIGNALS_AT_START: extern "C" fn() = hold_signals_at_start;

extern "C" fn hold_signals_at_start() {
    if let Err(e) = baton_layers::sys::hold_control_signals() {
        eprintln!("baton: cannot hold signals during startup: {e}");
    }
}

fn main() -> ExitCode {
    // Before any thread exists (capabilities are per thread): a non-root baton holding
    // CAP_NET_ADMIN as a file capability passes it on to the `nft` and `ip` it runs.
    if let Err(e) = baton_layers::sys::inherit_net_admin() {
        eprintln!("baton: cannot pass CAP_NET_ADMIN on to nft and ip: {e}");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => run(&Env, None),
        ["demo"] => match demo::bind_upstreams() {
            Ok(listeners) => {
                let addrs: Vec<_> = listeners
                    .iter()
                    .filter_map(|l| l.local_addr().ok())
                    .collect();
                run(&Overlay(Env, demo::defaults(&addrs)), Some(listeners))
            }
            Err(e) => {
                eprintln!("baton demo: cannot bind demo upstreams: {e}");
                ExitCode::FAILURE
            }
        },
        ["init", ..] => {
            if let Err(e) = baton_layers::sys::release_control_signals() {
                eprintln!("baton: cannot unblock signals: {e}");
            }
            match args[1..].iter().map(String::as_str).collect::<Vec<_>>()[..] {
                [] => init::main(&Env, init::Action::Install),
                ["--dry-run"] => init::main(&Env, init::Action::DryRun),
                ["--cleanup"] => init::main(&Env, init::Action::Cleanup),
                _ => {
                    eprint!("baton: unknown arguments {args:?}\n{USAGE}");
                    ExitCode::from(2)
                }
            }
        }
        ["version" | "--version" | "-V"] => {
            println!("baton {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprint!("baton: unknown arguments {args:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(strings: &impl Strings, demo_upstreams: Option<Vec<std::net::TcpListener>>) -> ExitCode {
    let config = match Config::from_strings(strings) {
        Ok(c) => c,
        Err(ConfigError(errors)) => {
            eprintln!(
                "baton: invalid configuration ({} problem{}):",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            for e in &errors {
                eprintln!("  {}={:?}: {}", e.name, e.value, e.expected);
            }
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let runtime = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .thread_name("baton-worker")
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Some(listeners) = demo_upstreams {
            demo::serve_upstreams(listeners).await?;
            tracing::info!(
                "demo: try `curl http://127.0.0.1:15006/` (admin: http://127.0.0.1:15021/metrics)"
            );
        }
        app::run(config).await
    });
    // Do not wait for tasks still running (connections past the grace period).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    // The filter was validated while parsing the configuration.
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
