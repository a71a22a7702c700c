//! Assembling the stacks: one function per level, outermost first, each saying why
//! its layers sit where they do.
//!
//! ```text
//! HTTP request (per connection: ClientInfo attached, see serve.rs)
//!   InFlightLimit        shed first: an overloaded proxy must not route or queue
//!   Router               path/host/port -> Logical, 404 here
//!   NewCache<Logical>    one logical stack per service, shared, evicted when idle
//!     ErrorResponse      every failure below becomes a status + one-line body
//!     RequestMetrics     counts what the client gets, including baton's own errors
//!     Timeout            one deadline for the request, retries included
//!     Retry              connect failures only; re-enters the balancer
//!     Share              shares the single-owner balancer between connections
//!     Balancer           p2c | rr | hash over discovery; fails fast with no endpoints
//!       endpoint         Eject (out while failing to connect) -> span -> Count (balancer
//!                        choices) -> Terminal: handoff, else HttpProxy
//!
//! Opaque connection: route by port -> NewCache<Logical> -> Retry -> Share ->
//!   Balancer over Eject -> TcpConnect -> splice
//! ```

use crate::config::Config;
use baton_discovery::{Instance, Registry, Resolution};
use baton_layers::{
    balance::{EwmaConfig, HashKey, NewBalance},
    body::Body,
    cache::NewCache,
    eject::{EjectConfig, NewEject},
    errors::ErrorResponseLayer,
    handoff::{
        fe::{NewTerminal, Terminal},
        Handoff,
    },
    limit::{InFlightLimit, InFlightLimitLayer},
    metrics::{Count, Metrics, RequestMetricsLayer},
    new_service::{ArcNewService, NewService, NewServiceFn},
    proxy::{
        connect::ConnectConfig,
        http::{ClientConfig, HttpProxy, NewHttpProxy},
        tcp::{ClientIpKey, NewTcpConnect, OpaqueRequest},
    },
    retry::ConnectRetry,
    route::{Router, Routes},
    share::Share,
    target::{Endpoint, Logical, Protocol, LOCAL},
    trace::{EndpointSpan, Trace, TraceLayer},
    Error,
};
use futures_util::TryStreamExt;
use http::{Request, Response};
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};
use tokio::net::TcpStream;
use tower::{
    discover::Change, retry::RetryLayer, util::BoxCloneSyncService, Layer, Service, ServiceBuilder,
};

/// A logical HTTP stack, type-erased at the cache boundary.
pub type BoxHttp = BoxCloneSyncService<Request<Body>, Response<Body>, Error>;
/// A logical opaque stack: a connection to the chosen endpoint.
pub type BoxOpaque = BoxCloneSyncService<OpaqueRequest, TcpStream, Error>;
/// A cache of logical stacks.
pub type LogicalCache<S> = NewCache<Logical, ArcNewService<Logical, S>>;
/// The whole HTTP request stack.
pub type HttpStack = InFlightLimit<Router<Logical, LogicalCache<BoxHttp>>>;

/// The stacks a connection is served with.
#[derive(Clone)]
pub struct Stacks {
    /// HTTP requests.
    pub http: HttpStack,
    /// Opaque connection routes (the HTTP routes' `port:` and `*` entries).
    pub opaque_routes: Routes<Logical>,
    /// Opaque logical stacks.
    pub opaque: LogicalCache<BoxOpaque>,
}

/// Builds the production stacks (HTTP and opaque, proxying to endpoints).
pub fn build(
    cfg: &Config,
    registry: &Registry,
    metrics: &Metrics,
    handoff: Option<Arc<Handoff>>,
) -> Stacks {
    let connect = Arc::new(ConnectConfig {
        timeout: cfg.connect_timeout,
        keepalive: Some(cfg.tcp_keepalive).filter(|d| !d.is_zero()),
        ..ConnectConfig::default()
    });
    let http_endpoint = http_endpoint(
        ClientConfig {
            connect: connect.clone(),
            pool_idle_timeout: cfg.pool_idle_timeout,
            pool_max_idle: cfg.pool_max_idle,
        },
        metrics,
        handoff,
    );
    Stacks {
        http: http(cfg, registry, metrics, http_endpoint),
        opaque_routes: opaque_routes(cfg),
        opaque: opaque(cfg, registry, metrics, connect),
    }
}

/// The endpoint level of HTTP: count the balancer's choice, then the terminal, which
/// hands the connection off when it can and proxies otherwise.
fn http_endpoint(
    client: ClientConfig,
    metrics: &Metrics,
    handoff: Option<Arc<Handoff>>,
) -> impl NewService<Endpoint, Service = Count<Terminal<HttpProxy>>> + Clone + Send + Sync + 'static
{
    let proxy = NewTerminal::new(NewHttpProxy::new(client), handoff);
    let metrics = metrics.clone();
    NewServiceFn::new(move |ep: Endpoint| {
        let choices = metrics.choices(&ep.logical.service, ep.addr.to_string());
        Count::new(proxy.new_service(ep), choices)
    })
}

/// The HTTP request stack over the endpoint stack `endpoint` (the benchmarks pass a
/// stand-in terminal to measure the stack alone).
pub fn http<N>(cfg: &Config, registry: &Registry, metrics: &Metrics, endpoint: N) -> HttpStack
where
    N: NewService<Endpoint> + Clone + Send + Sync + 'static,
    N::Service: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    <N::Service as Service<Request<Body>>>::Error: Into<Error>,
    <N::Service as Service<Request<Body>>>::Future: Send + 'static,
{
    let logical = http_logical(cfg, registry, metrics, endpoint);
    let cache = NewCache::new(logical, cfg.service_idle_timeout);
    let routes = Routes::new(
        cfg.routes
            .iter()
            .map(|r| (r.matches.clone(), r.logical.clone()))
            .collect(),
    );
    let global = metrics.global();
    InFlightLimitLayer::new(
        cfg.max_in_flight,
        global.in_flight.clone(),
        global.shed.clone(),
    )
    .layer(Router::new(routes, cache).on_unrouted(global.unrouted.clone()))
}

/// One logical HTTP service: answers for every failure, metrics, the deadline, retries,
/// and the shared balancer.
fn http_logical<N>(
    cfg: &Config,
    registry: &Registry,
    metrics: &Metrics,
    endpoint: N,
) -> ArcNewService<Logical, BoxHttp>
where
    N: NewService<Endpoint> + Clone + Send + Sync + 'static,
    N::Service: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    <N::Service as Service<Request<Body>>>::Error: Into<Error>,
    <N::Service as Service<Request<Body>>>::Future: Send + 'static,
{
    let endpoint = ejecting(cfg, metrics, endpoint);
    let balance = new_balance(cfg, registry, endpoint, cfg.hash_key.clone());
    let (metrics, timeout, retries) = (metrics.clone(), cfg.request_timeout, cfg.retries);
    ArcNewService::new(NewServiceFn::new(move |logical: Logical| {
        let balancer = Share::new(balance.new_service(logical.clone()));
        let service = logical.service.clone();
        BoxHttp::new(
            ServiceBuilder::new()
                .layer(TraceLayer::new(
                    move || tracing::debug_span!("logical", %service),
                ))
                .layer(ErrorResponseLayer::new(logical.service.clone()))
                .layer(RequestMetricsLayer::new(metrics.service(&logical.service)))
                .timeout(timeout)
                .layer(RetryLayer::new(ConnectRetry::new(retries)))
                .service(balancer),
        )
    }))
}

/// Routes for opaque connections: the same table, selecting opaque logical services.
fn opaque_routes(cfg: &Config) -> Routes<Logical> {
    Routes::new(
        cfg.routes
            .iter()
            .map(|r| {
                let logical = Logical {
                    protocol: Protocol::Opaque,
                    ..r.logical.clone()
                };
                (r.matches.clone(), logical)
            })
            .collect(),
    )
}

/// One logical opaque service: retries of failed connects over the shared balancer.
fn opaque(
    cfg: &Config,
    registry: &Registry,
    metrics: &Metrics,
    connect: Arc<ConnectConfig>,
) -> LogicalCache<BoxOpaque> {
    let tcp = NewTcpConnect::new(connect);
    let counters = metrics.clone();
    let endpoint = NewServiceFn::new(move |ep: Endpoint| {
        let choices = counters.choices(&ep.logical.service, ep.addr.to_string());
        Count::new(tcp.new_service(ep), choices)
    });
    let balance = new_balance(cfg, registry, ejecting(cfg, metrics, endpoint), ClientIpKey);
    let retries = cfg.retries;
    let logical = ArcNewService::new(NewServiceFn::new(move |logical: Logical| {
        let balancer = Share::new(balance.new_service(logical));
        BoxOpaque::new(
            ServiceBuilder::new()
                .layer(RetryLayer::new(ConnectRetry::new(retries)))
                .service(balancer),
        )
    }));
    NewCache::new(logical, cfg.service_idle_timeout)
}

/// Endpoints that cannot be connected to leave their balancer for a while
/// (`BATON_EJECT_*`): inside the balancer, which reads their readiness, and outside
/// everything else at the endpoint level, so it sees every connect failure.
///
/// Each endpoint's requests run in its `endpoint{service, addr}` span.
fn ejecting<N>(cfg: &Config, metrics: &Metrics, endpoint: N) -> NewEject<NewTraced<N>> {
    let metrics = metrics.clone();
    let eject = EjectConfig {
        failures: cfg.eject_failures,
        time: cfg.eject_time,
        time_max: cfg.eject_time_max,
    };
    NewEject::new(NewTraced(endpoint), eject, move |ep: &Endpoint| {
        metrics.ejections(&ep.logical.service, ep.addr.to_string())
    })
}

/// Endpoint services in their endpoint's span.
#[derive(Clone, Debug)]
pub struct NewTraced<N>(N);

impl<N: NewService<Endpoint>> NewService<Endpoint> for NewTraced<N> {
    type Service = Trace<N::Service, EndpointSpan>;

    fn new_service(&self, ep: Endpoint) -> Self::Service {
        let span = EndpointSpan::from(&ep);
        TraceLayer::new(span).layer(self.0.new_service(ep))
    }
}

/// A balancer factory resolving services in `registry`.
fn new_balance<N, K, Req>(
    cfg: &Config,
    registry: &Registry,
    endpoint: N,
    key: K,
) -> NewBalance<impl Fn(&Logical) -> Endpoints + Clone, N, K, Req>
where
    K: HashKey<Req>,
{
    let registry = registry.clone();
    let local = LocalApp {
        ip: cfg.local_ip,
        own_ports: own_ports(cfg),
    };
    let resolve = move |logical: &Logical| {
        if let (true, Some(dst)) = (logical.is_local(), logical.dst) {
            local.publish(&registry, dst);
        }
        endpoints(&registry, logical)
    };
    let ewma = EwmaConfig {
        default_rtt: cfg.ewma_default_rtt,
        decay: cfg.ewma_decay,
    };
    NewBalance::new(resolve, endpoint, key, ewma)
}

/// The discovery stream of a logical service's endpoints.
pub type Endpoints = futures_util::stream::MapOk<
    Resolution,
    Box<
        dyn FnMut(Change<Arc<str>, baton_discovery::Instance>) -> Change<Arc<str>, Endpoint>
            + Send
            + Sync,
    >,
>;

/// baton's own listening ports.
fn own_ports(cfg: &Config) -> Vec<u16> {
    let mut ports = vec![cfg.inbound_addr.port(), cfg.admin_addr.port()];
    ports.extend(cfg.handoff.as_ref().map(|h| h.addr.port()));
    ports
}

/// The route target `local`: the application at the original destination (or at
/// `BATON_LOCAL_IP` on the original destination's port).
#[derive(Clone, Debug)]
struct LocalApp {
    ip: Option<IpAddr>,
    own_ports: Vec<u16>,
}

/// The registry name of the local application at `dst`.
fn local_name(dst: SocketAddr) -> String {
    format!("{LOCAL}:{dst}")
}

impl LocalApp {
    /// Publishes the application at `dst` as service `local:IP:PORT`, so `local`
    /// targets resolve like any other and show in `/metrics`. baton's own ports get no
    /// endpoint (503): the inbound one would loop, and the admin and handoff ones are
    /// not for clients.
    fn publish(&self, registry: &Registry, dst: SocketAddr) {
        let name = local_name(dst);
        if registry.is_resolved(&name) {
            return;
        }
        if self.own_ports.contains(&dst.port()) {
            tracing::warn!(%dst, "route target local for one of baton's own ports: no endpoint");
            registry.publish(&name, []);
        } else {
            let ip = self.ip.unwrap_or(dst.ip());
            registry.publish(&name, [Instance::new(SocketAddr::new(ip, dst.port()))]);
        }
    }
}

/// Resolves `logical` in `registry`, as endpoint targets.
pub fn endpoints(registry: &Registry, logical: &Logical) -> Endpoints {
    let logical = logical.clone();
    let name = match (logical.is_local(), logical.dst) {
        (true, Some(dst)) => local_name(dst),
        _ => logical.service.to_string(),
    };
    registry
        .resolve(&name)
        .map_ok(Box::new(move |change| match change {
            Change::Insert(id, i) => Change::Insert(
                id.clone(),
                Endpoint {
                    logical: logical.clone(),
                    id,
                    addr: i.addr,
                    handoff_port: i.handoff_port,
                    weight: i.weight,
                },
            ),
            Change::Remove(id) => Change::Remove(id),
        }))
}
