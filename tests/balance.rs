//! Balancing through a real baton process: round-robin alternates exactly, p2c avoids
//! a slow endpoint, hashing is sticky and moves few keys when membership changes.

mod support;

use http::StatusCode;
use std::{collections::HashMap, time::Duration};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_alternates_exactly() {
    let a = Upstream::start("a", Behaviour::default()).await;
    let b = Upstream::start("b", Behaviour::default()).await;
    let c = Upstream::start("c", Behaviour::default()).await;
    let baton = route_all("web", &[&a, &b, &c], &[("BATON_LB", "rr")]).await;
    let mut order = Vec::new();
    for _ in 0..30 {
        let got = get(baton.addr, "/").await;
        assert_eq!(got.0, StatusCode::OK);
        order.push(upstream_of(&got));
    }
    let first: Vec<&String> = order[..3].iter().collect();
    let mut distinct = first.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{order:?}");
    for (i, name) in order.iter().enumerate() {
        assert_eq!(
            name,
            first[i % 3],
            "position {i} breaks the rotation: {order:?}"
        );
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (10, 10, 10));
}

#[tokio::test(flavor = "multi_thread")]
async fn p2c_sends_clearly_less_to_a_slow_endpoint() {
    let fast = Upstream::start("fast", Behaviour::default()).await;
    let slow = Upstream::start(
        "slow",
        Behaviour {
            delay: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .await;
    let baton = route_all("web", &[&fast, &slow], &[]).await;
    let addr = baton.addr;
    // Eight concurrent clients, 40 requests each.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..40 {
                    assert_eq!(get(addr, "/").await.0, StatusCode::OK);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let (f, s) = (fast.hits(), slow.hits());
    assert_eq!(f + s, 320);
    // Round-robin would give 160 each; p2c over PeakEWMA starves the slow one.
    assert!(s * 5 < f, "slow endpoint got {s} of 320 (fast {f})");
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_is_sticky_and_moves_few_keys_when_an_endpoint_joins() {
    let ups = [
        Upstream::start("a", Behaviour::default()).await,
        Upstream::start("b", Behaviour::default()).await,
        Upstream::start("c", Behaviour::default()).await,
    ];
    let joiner = Upstream::start("d", Behaviour::default()).await;
    let dir = std::env::temp_dir().join(format!("baton-hash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("services");
    std::fs::write(&file, services("web", &[&ups[0], &ups[1], &ups[2]])).unwrap();
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_FILE", file.to_str().unwrap()),
        ("BATON_LB", "hash"),
        ("BATON_HASH_KEY", "header:x-user"),
    ])
    .await;
    let owners = |baton_addr| async move {
        let mut map = HashMap::new();
        for k in 0..300 {
            let user = format!("user-{k}");
            let got = try_get(baton_addr, "/", &[("x-user", &user)])
                .await
                .unwrap();
            map.insert(user, upstream_of(&got));
        }
        map
    };
    let before = owners(baton.addr).await;
    assert_eq!(
        owners(baton.addr).await,
        before,
        "the same key goes to the same endpoint"
    );
    for name in ["a", "b", "c"] {
        let share = before.values().filter(|v| *v == name).count();
        assert!(
            (60..=140).contains(&share),
            "{name} owns {share} of 300 keys"
        );
    }

    // An endpoint joins (file change + SIGHUP).
    std::fs::write(
        &file,
        services("web", &[&ups[0], &ups[1], &ups[2], &joiner]),
    )
    .unwrap();
    baton.signal("HUP");
    for _ in 0..100 {
        if metric(&baton.metrics().await, "baton_endpoints{service=\"web\"}") == 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = owners(baton.addr).await;
    let moved: Vec<_> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    let to_new = moved.iter().filter(|k| after[**k] == "d").count();
    assert!(to_new > 30, "the new endpoint takes its share ({to_new})");
    assert!(
        moved.len() < 300 * 35 / 100,
        "{} of 300 keys moved (ideal 75)",
        moved.len()
    );
    assert!(
        moved.len() - to_new <= 3,
        "{} keys moved between old endpoints",
        moved.len() - to_new
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn per_service_algorithm_overrides() {
    let w1 = Upstream::start("w1", Behaviour::default()).await;
    let w2 = Upstream::start("w2", Behaviour::default()).await;
    let o1 = Upstream::start("o1", Behaviour::default()).await;
    let o2 = Upstream::start("o2", Behaviour::default()).await;
    let svc = format!(
        "{};{}",
        services("web", &[&w1, &w2]),
        services("objects", &[&o1, &o2])
    );
    let baton = Baton::start(&[
        ("BATON_ROUTES", "path:/objects=objects;*=web"),
        ("BATON_STATIC_SERVICES", &svc),
        ("BATON_LB", "rr"),
        ("BATON_LB_OVERRIDES", "objects=hash"),
    ])
    .await;
    let web: Vec<String> = futures_collect(baton.addr, "/page", 4).await;
    assert_ne!(web[0], web[1], "web alternates: {web:?}");
    assert_eq!(web[0], web[2]);
    let objects: Vec<String> = futures_collect(baton.addr, "/objects/42", 4).await;
    assert!(
        objects.iter().all(|o| *o == objects[0]),
        "objects sticks by path: {objects:?}"
    );
    let cfg = get(baton.admin, "/config").await;
    let json: serde_json::Value = serde_json::from_slice(&cfg.2).unwrap();
    assert_eq!(json["routes"][0]["logical"]["lb"], "hash");
    assert_eq!(json["routes"][1]["logical"]["lb"], "rr");
}

async fn futures_collect(addr: std::net::SocketAddr, path: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(upstream_of(&get(addr, path).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_endpoint_stops_receiving_traffic() {
    let a = Upstream::start("a", Behaviour::default()).await;
    let b = Upstream::start("b", Behaviour::default()).await;
    let dir = std::env::temp_dir().join(format!("baton-remove-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("services");
    std::fs::write(&file, services("web", &[&a, &b])).unwrap();
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_FILE", file.to_str().unwrap()),
        ("BATON_LB", "rr"),
    ])
    .await;
    for _ in 0..4 {
        get(baton.addr, "/").await;
    }
    assert_eq!((a.hits(), b.hits()), (2, 2));
    // No SIGHUP: the file's change is noticed by polling.
    std::fs::write(&file, services("web", &[&a])).unwrap();
    for _ in 0..200 {
        if metric(&baton.metrics().await, "baton_endpoints{service=\"web\"}") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for _ in 0..6 {
        assert_eq!(get(baton.addr, "/").await.0, StatusCode::OK);
    }
    assert_eq!((a.hits(), b.hits()), (8, 2), "b gets nothing after removal");
    std::fs::remove_dir_all(&dir).unwrap();
}
