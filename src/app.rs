//! Running the sidecar: discovery, stacks, listeners, admin, signals, drain.

use crate::{
    admin::{self, Admin, State},
    config::{Config, DiscoveryKind, HandoffSettings},
    leave::Leave,
    listen,
    serve::{ServeConfig, Server},
    stack,
};
use anyhow::Context;
use baton_discovery::{
    consul::{
        self,
        api::{HttpCheck, Registration, Weights, META_HANDOFF_PORT, META_VERSION},
        register::Registrar,
        watch::Watch,
    },
    static_source, Registry,
};
use baton_layers::{
    handoff::{diag, nft, repair, tables, Handoff, HandoffConfig},
    metrics::Metrics,
};
use std::sync::{atomic::Ordering, Arc};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::{watch, Notify},
};

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // First: a signal from now on is kept for the loop at the end of startup (SIGHUP is
    // a reload, SIGTERM/SIGINT a drain once startup is done), never the default action.
    let mut signals = Signals::install()?;
    tracing::info!(config = %config.to_json(), "starting baton {}", env!("CARGO_PKG_VERSION"));
    let metrics = Metrics::new();
    let registry = Registry::new();
    let reload = Arc::new(Notify::new());
    start_discovery(&config, &registry, reload.clone());
    if config.routes.is_empty() {
        tracing::warn!("BATON_ROUTES is empty: every request will be answered 404");
    }

    let keepalive = Some(config.tcp_keepalive).filter(|d| !d.is_zero());
    let listener =
        listen::bind(config.inbound_addr, config.inbound_mode, keepalive).with_context(|| {
            format!(
                "cannot listen on BATON_INBOUND_ADDR={} (mode {:?})",
                config.inbound_addr, config.inbound_mode
            )
        })?;
    let admin_listener = listen::bind_plain(config.admin_addr)
        .with_context(|| format!("cannot listen on BATON_ADMIN_ADDR={}", config.admin_addr))?;
    let inbound_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let state = Arc::new(State::default());
    let leave = Arc::new(Leave::new(state.clone()));
    let admin = Arc::new(Admin {
        leave: leave.clone(),
        state: state.clone(),
        config_json: serde_json::to_vec_pretty(&config.to_json())?.into(),
        metrics: metrics.clone(),
        registry: registry.clone(),
        routed: config.routed_services(),
    });
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop_rx));

    let (drain, drain_rx) = watch::channel(false);
    let handoff = match &config.handoff {
        Some(settings) => start_handoff(settings, &metrics, drain_rx.clone()).await?,
        None => None,
    };
    let registrar = match &config.registration {
        Some(_) => Some(Arc::new(registrar(
            &config,
            admin_addr,
            handoff.as_deref(),
        )?)),
        None => None,
    };
    let stacks = stack::build(&config, &registry, &metrics, handoff.clone());
    let server = Arc::new(Server::new(
        ServeConfig {
            detect_timeout: config.detect_timeout,
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            opaque_ports: config.opaque_ports.clone(),
            idle_park: config.idle_park,
        },
        stacks,
        metrics,
        handoff,
    ));
    let accept = tokio::spawn(listen::accept_loop(
        listener,
        config.inbound_mode,
        server,
        drain_rx,
    ));
    state.listening.store(true, Ordering::Release);
    tracing::info!(inbound = %inbound_addr, admin = %admin_addr, mode = ?config.inbound_mode, "listening");
    if let Some(registrar) = registrar {
        leave.register(registrar).await;
    }

    let signal = signals.wait(&reload).await;
    tracing::info!(signal, grace = ?config.shutdown_grace, "shutting down: no longer ready, draining connections");
    // Leave Consul first (unless POST /drain already did), so peers stop choosing this
    // instance while it still serves what they send; a check on /ready would notice
    // only later. Peers learn of the removal through their own watches: until then
    // they may still connect, and are accepted and served.
    if leave.shut_down().await {
        if let Some(delay) = config.registration.as_ref().map(|r| r.deregister_delay) {
            tracing::info!(?delay, "accepting until peers have seen the deregistration");
            tokio::time::sleep(delay).await;
        }
    }
    let _ = drain.send(true);
    let _ = accept.await;
    // Every connection task holds a receiver: `closed` resolves when the last ends.
    match tokio::time::timeout(config.shutdown_grace, drain.closed()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            remaining = drain.receiver_count(),
            "grace period over; closing the remaining connections"
        ),
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    Ok(())
}

/// Sets up connection handoff: checks the kernel allows it, installs the kernel
/// tables, starts the receiver and the socket-destruction watch. Without privileges
/// (or nftables) it warns once and returns `None`: baton runs in proxy mode. A receiver
/// address that cannot be bound is a startup error, like the inbound listener's.
async fn start_handoff(
    settings: &HandoffSettings,
    metrics: &Metrics,
    drain: watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<Handoff>>> {
    let disabled = |why: String| {
        tracing::warn!(
            reason = %why,
            "BATON_HANDOFF=on, but handoff is not possible here (it needs CAP_NET_ADMIN and nftables); running in proxy mode"
        );
        Ok(None)
    };
    if let Err(e) = repair::probe() {
        return disabled(format!("TCP_REPAIR refused: {e}"));
    }
    let interface = match settings
        .interface
        .clone()
        .map_or_else(tables::default_interface, Ok)
    {
        Ok(i) => i,
        Err(e) => {
            return disabled(format!(
                "no handoff interface ({e}); set BATON_HANDOFF_INTERFACE"
            ))
        }
    };
    let existed = match tokio::task::spawn_blocking({
        let (interface, ttl) = (interface.clone(), settings.flow_ttl);
        move || tables::install(&interface, ttl)
    })
    .await?
    {
        Ok(existed) => existed,
        Err(e) => return disabled(format!("cannot install the kernel tables: {e}")),
    };
    let nets = match tables::interface_nets(&interface) {
        Ok(n) => n,
        Err(e) => return disabled(e),
    };
    // This host as frontends' redirects name it: the receiver's own address, or
    // (listening on all) the interface's first.
    let be_addr = match settings.addr.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => tables::interface_addrs(&interface)
            .ok()
            .and_then(|a| a.first().map(|n| n.addr())),
    };
    let table = nft::Tables::new(
        tables::TABLE,
        // Held far beyond any handoff (the FE waits up to twice the timeout), short
        // enough that a crash mid-handoff heals quickly.
        HOLD_TTL.max(settings.timeout * 4),
        settings.flow_ttl,
    );
    // The per-flow netlink path works here (removing an absent element needs
    // NFT_MSG_DESTROYSETELEM, Linux 6.3+), or handoff stays off.
    if let Err(e) = table.probe() {
        return disabled(format!(
            "nftables element updates failed ({e}); Linux 6.3 or later is needed"
        ));
    }
    let listener = listen::bind_plain(settings.addr)
        .with_context(|| format!("cannot listen on BATON_HANDOFF_ADDR={}", settings.addr))?;
    let listen_port = listener.local_addr()?.port();
    let handoff = Handoff::new(
        HandoffConfig {
            key: settings.key.clone(),
            timeout: settings.timeout,
            listen_port,
            default_port: settings.port,
            fe_cidrs: settings.fe_cidrs.clone().unwrap_or_else(|| nets.clone()),
            peer_nets: nets,
            services: settings.routes.clone(),
            app_addr: settings.app_addr,
            app_pass: settings.app_pass.clone(),
            min_bytes: settings.min_bytes,
            tables: table,
        },
        metrics.clone(),
    );
    match diag::subscribe() {
        Ok(socket) => {
            let h = handoff.clone();
            tokio::spawn(async move {
                if let Err(e) = diag::watch(h, socket).await {
                    tracing::warn!(error = %e, "socket destruction watch ended; moved flows now expire by BATON_HANDOFF_FLOW_TTL");
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "no socket destruction notices; moved flows expire by BATON_HANDOFF_FLOW_TTL")
        }
    }
    // Moved connections of an earlier baton here: watched on (a passed one lives in
    // the application) or, with their sockets gone, forgotten now.
    match be_addr {
        None => tracing::warn!(%interface, "the handoff interface has no IPv4 address: moved connections left by an earlier baton expire by BATON_HANDOFF_FLOW_TTL"),
        Some(be) => match tokio::task::spawn_blocking(tables::restored_flows).await? {
            Ok(flows) => match handoff.adopt(flows, be, settings.port).await {
                Ok((0, 0)) => {}
                Ok((kept, gone)) => tracing::info!(
                    kept,
                    gone,
                    "moved connections left by an earlier baton: live ones kept, ended ones forgotten"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot check the moved connections left by an earlier baton; the periodic sweep will"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot read the restored set; its flows expire by BATON_HANDOFF_FLOW_TTL"),
        },
    }
    tokio::spawn(handoff.clone().receive(listener, drain));
    tokio::spawn(handoff.clone().refresh());
    tokio::spawn(handoff.clone().notices());
    metrics.global().handoff.enabled.incr();
    // Loads the hold's eBPF filter now rather than at the first handoff.
    let hold_filter = repair::hold_kind();
    tracing::info!(
        %interface,
        receiver = %settings.addr,
        kept_existing_table = existed,
        hold_filter,
        "connection handoff on"
    );
    Ok(Some(handoff))
}

/// The least time a flow stays held (frozen) before the kernel lets its packets
/// through again.
const HOLD_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Publishes static services and watches the static file; with Consul discovery,
/// starts a watch of every routed service the static source does not define.
fn start_discovery(config: &Config, registry: &Registry, reload: Arc<Notify>) {
    match &config.static_file {
        None => static_source::publish(registry, &config.static_services),
        Some(path) => {
            let watch = static_source::FileWatch::new(
                path.clone(),
                config.static_services.clone(),
                registry.clone(),
                reload,
            );
            // Publishes the startup content (env merged with file), then watches.
            tokio::spawn(watch.run(config.static_file_services.clone()));
        }
    }
    if let (DiscoveryKind::Consul, Some(settings)) = (config.discovery, &config.consul) {
        let client = consul::Client::new(settings.client.clone());
        let watched: Vec<_> = config
            .routed_services()
            .into_iter()
            .filter(|s| {
                !config.static_services.contains_key(&**s)
                    && !config.static_file_services.contains_key(&**s)
            })
            .collect();
        tracing::info!(agent = %settings.client.url(), services = ?watched, "discovering services in Consul");
        for service in watched {
            let watch = Watch::new(
                client.clone(),
                service,
                registry.clone(),
                settings.watch.clone(),
            );
            tokio::spawn(watch.supervise());
        }
    }
}

/// The registration of the local service: its address and port, metadata (baton's
/// version and, when handoff runs, the receiver's port), and an HTTP check of `/ready`
/// on the admin server.
fn registrar(
    config: &Config,
    admin_addr: std::net::SocketAddr,
    handoff: Option<&Handoff>,
) -> anyhow::Result<Registrar> {
    let (Some(reg), Some(settings)) = (&config.registration, &config.consul) else {
        anyhow::bail!("registration without Consul settings");
    };
    let mut meta = reg.meta.clone();
    meta.insert(META_VERSION.into(), env!("CARGO_PKG_VERSION").into());
    if let Some(h) = handoff {
        meta.insert(META_HANDOFF_PORT.into(), h.config().listen_port.to_string());
    }
    // The agent reaches the admin server at the registered address unless the admin
    // server listens on one address only.
    let check_ip = if admin_addr.ip().is_unspecified() {
        reg.address
    } else {
        admin_addr.ip()
    };
    let registration = Registration {
        id: reg.id.clone(),
        name: reg.name.clone(),
        tags: reg.tags.clone(),
        address: reg.address.to_string(),
        port: reg.port,
        meta,
        weights: Weights {
            passing: reg.weight,
            warning: 1,
        },
        check: HttpCheck {
            name: "baton ready".into(),
            http: format!(
                "http://{}/ready",
                std::net::SocketAddr::new(check_ip, admin_addr.port())
            ),
            interval: consul::go_duration(reg.check_interval),
            timeout: consul::go_duration(reg.check_timeout),
            deregister_critical_service_after: consul::go_duration(reg.deregister_after),
        },
    };
    Ok(Registrar::new(
        consul::Client::new(settings.client.clone()),
        &registration,
        settings.watch.wait,
        settings.watch.backoff_base,
        settings.watch.backoff_max,
    )?)
}

/// The signal streams of the process, installed first thing in startup.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers, then lets the signals held since `main` started through
    /// (see `sys::hold_control_signals`): one that arrived meanwhile is seen by
    /// [`Signals::wait`].
    fn install() -> anyhow::Result<Self> {
        let signals = Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        };
        baton_layers::sys::release_control_signals().context("cannot unblock signals")?;
        Ok(signals)
    }

    /// Waits for SIGTERM or SIGINT; SIGHUP asks discovery to reload its file.
    async fn wait(&mut self, reload: &Notify) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the static service file");
                    reload.notify_one();
                }
            }
        }
    }
}
