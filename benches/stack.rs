//! In-process cost of the request stack, per request and per algorithm.
//!
//! The full HTTP stack (shedding, routing, the logical cache, error mapping, metrics,
//! timeout, retry, buffer, balancer, endpoint counting) in front of a stand-in terminal
//! that answers at once — so the figure is baton's own overhead per request, without
//! sockets. Also: protocol detection and Maglev lookups.

use baton::{config::Config, stack};
use baton_discovery::{static_source, Registry};
use baton_layers::{
    balance::Maglev,
    body::Body,
    detect,
    metrics::Metrics,
    new_service::NewServiceFn,
    target::{Accept, ClientInfo, Endpoint},
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{Request, Response};
use std::{collections::HashMap, convert::Infallible, hint::black_box};
use tower::{service_fn, ServiceExt};

fn config(lb: &str) -> Config {
    let vars: HashMap<&str, &str> = [
        ("BATON_ROUTES", "path:/objects=objects;host:meta=meta;*=web"),
        (
            "BATON_STATIC_SERVICES",
            "web=10.0.0.1:80,10.0.0.2:80,10.0.0.3:80;objects=10.0.1.1:80;meta=10.0.2.1:80",
        ),
        ("BATON_LB", lb),
    ]
    .into_iter()
    .collect();
    Config::from_strings(&vars).expect("bench config")
}

fn request(client: &ClientInfo, i: u64) -> Request<Body> {
    let mut req = Request::get(format!("/page/{}", i % 64))
        .header("host", "web.example")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(Body::Empty)
        .expect("request");
    req.extensions_mut().insert(client.clone());
    req
}

fn stack_per_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = ClientInfo::new(Accept {
        client: "10.9.0.1:40000".parse().expect("addr"),
        orig_dst: "10.9.0.2:80".parse().expect("addr"),
    });
    let mut group = c.benchmark_group("stack");
    group.throughput(Throughput::Elements(1));
    for lb in ["p2c", "rr", "hash"] {
        let cfg = config(lb);
        let (svc, registry) = rt.block_on(async {
            let registry = Registry::new();
            static_source::publish(&registry, &cfg.static_services);
            // A terminal that answers at once: what remains is the stack's own cost.
            let terminal = NewServiceFn::new(|_: Endpoint| {
                service_fn(|_: Request<Body>| async {
                    Ok::<_, Infallible>(Response::new(Body::Empty))
                })
            });
            (
                stack::http(&cfg, &registry, &Metrics::new(), terminal),
                registry,
            )
        });
        let mut i = 0u64;
        group.bench_function(format!("request/{lb}"), |b| {
            b.to_async(&rt).iter_batched(
                || {
                    i += 1;
                    request(&client, i)
                },
                |req| {
                    let svc = svc.clone();
                    async move {
                        let rsp = svc.oneshot(req).await.expect("response");
                        assert_eq!(rsp.status(), 200);
                        rsp
                    }
                },
                BatchSize::SmallInput,
            )
        });
        drop(registry);
    }
    group.finish();
}

fn detection(c: &mut Criterion) {
    let head =
        b"GET /objects/1234 HTTP/1.1\r\nHost: objects\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n";
    c.bench_function("detect/http1", |b| {
        b.iter(|| detect::classify(black_box(head), 65536))
    });
}

fn maglev(c: &mut Criterion) {
    let keys: Vec<u64> = (0..16u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    c.bench_function("maglev/build16", |b| {
        b.iter(|| Maglev::new(black_box(&keys)))
    });
    let table = Maglev::new(&keys);
    let mut h = 0u64;
    c.bench_function("maglev/lookup", |b| {
        b.iter(|| {
            h = h.wrapping_add(0x9e37_79b9);
            table.probe(black_box(h)).next()
        })
    });
}

criterion_group!(benches, stack_per_request, detection, maglev);
criterion_main!(benches);
