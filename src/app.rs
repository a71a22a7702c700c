//! Running the sidecar: discovery, stacks, listeners, admin, signals, drain.

use crate::{
    admin::{self, Admin, State},
    config::{Config, DiscoveryKind},
    listen,
    serve::{ServeConfig, Server},
    stack,
};
use anyhow::Context;
use baton_discovery::{static_source, Registry};
use baton_layers::metrics::Metrics;
use std::sync::{atomic::Ordering, Arc};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{watch, Notify},
};

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = %config.to_json(), "starting baton {}", env!("CARGO_PKG_VERSION"));
    let metrics = Metrics::new();
    let registry = Registry::new();
    let reload = Arc::new(Notify::new());
    start_discovery(&config, &registry, reload.clone());
    if config.routes.is_empty() {
        tracing::warn!("BATON_ROUTES is empty: every request will be answered 404");
    }

    let listener = listen::bind(config.inbound_addr, config.inbound_mode).with_context(|| {
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
    let admin = Arc::new(Admin {
        state: state.clone(),
        config_json: serde_json::to_vec_pretty(&config.to_json())?.into(),
        metrics: metrics.clone(),
        registry: registry.clone(),
        routed: config.routed_services(),
    });
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop_rx));

    let stacks = stack::build(&config, &registry, &metrics);
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
    ));
    let (drain, drain_rx) = watch::channel(false);
    let accept = tokio::spawn(listen::accept_loop(
        listener,
        config.inbound_mode,
        server,
        drain_rx,
    ));
    state.listening.store(true, Ordering::Release);
    tracing::info!(inbound = %inbound_addr, admin = %admin_addr, mode = ?config.inbound_mode, "listening");

    let signal = shutdown_signal(reload).await?;
    tracing::info!(signal, grace = ?config.shutdown_grace, "shutting down: no longer ready, draining connections");
    state.draining.store(true, Ordering::Release);
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

/// Publishes static services and watches the static file.
fn start_discovery(config: &Config, registry: &Registry, reload: Arc<Notify>) {
    match config.discovery {
        DiscoveryKind::Static => match &config.static_file {
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
        },
    }
}

/// Waits for SIGTERM or SIGINT; SIGHUP asks discovery to reload its file.
async fn shutdown_signal(reload: Arc<Notify>) -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok("SIGTERM"),
            _ = int.recv() => return Ok("SIGINT"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the static service file");
                reload.notify_one();
            }
        }
    }
}
