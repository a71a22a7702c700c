//! The BE side: the receiver on `BATON_HANDOFF_ADDR` that restores offered
//! connections and serves them from the local application.

use super::{
    read_message, repair,
    wire::{self, Flow, Message, Offer, Refusal},
    write_message, Handoff, ReadError,
};
use crate::proxy::tcp::{self, ForwardMetrics};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// How long a control connection may take to send its message.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The least a restored socket waits for "go" (beyond the FE's own timeout).
const GO_GRACE: Duration = Duration::from_millis(500);
/// Connecting to the local application.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Handoff {
    /// Accepts handoff control connections on `listener` until `drain` fires. Each
    /// moved connection's task holds a clone of `drain`, so shutdown waits for them.
    pub async fn receive(self: Arc<Self>, listener: TcpListener, mut drain: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.changed() => return,
            };
            match accepted {
                Ok((conn, from)) => {
                    let _ = conn.set_nodelay(true);
                    let this = self.clone();
                    let drain = drain.clone();
                    tokio::spawn(async move { this.control(conn, from, drain).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "handoff accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn refuse_read(&self, from: SocketAddr, e: &ReadError) {
        if let ReadError::Wire(w) = e {
            self.metrics().refused.get(w.as_str()).incr();
            tracing::warn!(%from, reason = w.as_str(), "refused a handoff message");
        }
    }

    async fn control(&self, mut conn: TcpStream, from: SocketAddr, drain: watch::Receiver<bool>) {
        let key = &self.cfg.key;
        let env = match tokio::time::timeout(READ_TIMEOUT, read_message(&mut conn, key)).await {
            Ok(Ok(env)) => env,
            Ok(Err(e)) => return self.refuse_read(from, &e),
            Err(_) => return,
        };
        if let Err(e) = self.replay.check(&env, wire::now_ms()) {
            return self.refuse_read(from, &ReadError::Wire(e));
        }
        match env.msg {
            Message::Offer(offer) => self.take(conn, from, env.nonce, offer, drain).await,
            Message::Closed(flow) => {
                // FE role: the BE's copy of a moved connection is gone.
                if let Err(e) = self.cfg.tables.forget_moved(flow) {
                    tracing::warn!(error = %e, client = %flow.client, "cannot remove a redirect");
                }
                self.metrics().closed_applied.incr();
            }
            _ => {
                self.metrics().refused.get("malformed").incr();
                tracing::warn!(%from, "unexpected handoff message");
            }
        }
    }

    async fn take(
        &self,
        mut conn: TcpStream,
        from: SocketAddr,
        nonce: [u8; 16],
        offer: Offer,
        drain: watch::Receiver<bool>,
    ) {
        let m = self.metrics();
        m.offers.incr();
        let flow = offer.flow();
        let refuse = |why: Refusal| {
            m.refused.get(why.as_str()).incr();
            tracing::warn!(%from, client = %flow.client, fe = %flow.local, reason = why.as_str(), "refused a handoff");
            wire::encode(&self.cfg.key, &wire::envelope(Message::Refused(nonce, why)))
        };
        let refusal = if !self
            .cfg
            .fe_cidrs
            .iter()
            .any(|n| n.contains(flow.local.ip()))
        {
            Some(Refusal::Cidr)
        } else if *drain.borrow() {
            Some(Refusal::Busy)
        } else {
            None
        };
        if let Some(why) = refusal {
            let _ = write_message(&mut conn, &refuse(why)).await;
            return;
        }
        let socket = match repair::restore(&offer.tcp) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore the offered socket");
                let _ = write_message(&mut conn, &refuse(Refusal::Restore)).await;
                return;
            }
        };
        if let Err(e) = self.cfg.tables.deliver(flow) {
            tracing::warn!(error = %e, "cannot install local delivery");
            repair::close_silently(&socket);
            let _ = write_message(&mut conn, &refuse(Refusal::Table)).await;
            return;
        }
        // Restored and reachable: say so, then write nothing before "go".
        let ready = wire::encode(&self.cfg.key, &wire::envelope(Message::Ready(nonce)));
        let wait = Duration::from_millis(u64::from(offer.timeout_ms)) + GO_GRACE;
        let go = async {
            write_message(&mut conn, &ready).await?;
            let env = read_message(&mut conn, &self.cfg.key).await?;
            self.replay.check(&env, wire::now_ms())?;
            Ok::<_, ReadError>(env.msg == Message::Go(nonce))
        };
        if !matches!(tokio::time::timeout(wait, go).await, Ok(Ok(true))) {
            // The FE kept the connection (or vanished): leave no trace.
            m.aborted.incr();
            repair::close_silently(&socket);
            let _ = self.cfg.tables.forget_restored(flow);
            tracing::debug!(client = %flow.client, "handoff aborted before go");
            return;
        }
        drop(conn);
        self.live().insert(flow, offer.fe_port);
        self.serve_moved(socket, flow, offer.data, drain).await;
    }

    /// Serves a moved connection: the carried bytes, then everything both ways, between
    /// the client and the local application.
    async fn serve_moved(
        &self,
        socket: socket2::Socket,
        flow: Flow,
        data: Vec<u8>,
        _drain: watch::Receiver<bool>,
    ) {
        let _active = self.metrics().active.track();
        let std: std::net::TcpStream = socket.into();
        let mut client = match TcpStream::from_std(std) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot register a restored socket");
                return;
            }
        };
        let app = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(self.cfg.app_addr));
        let mut app = match app.await {
            Ok(Ok(app)) => app,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(app = %self.cfg.app_addr, %error, "local application unreachable for a moved connection");
                let _ = client.write_all(BAD_GATEWAY).await;
                let _ = client.shutdown().await;
                return;
            }
        };
        let _ = app.set_nodelay(true);
        let metrics = ForwardMetrics::default();
        match tcp::forward(&mut client, &data, &mut app, &metrics).await {
            Ok((up, down)) => {
                tracing::debug!(client = %flow.client, to_app = up, to_client = down, "moved connection done")
            }
            Err(e) => tracing::debug!(client = %flow.client, error = %e, "moved connection ended"),
        }
    }

    /// The kernel destroyed a socket: if it was a moved connection, remove its local
    /// delivery and tell its FE to remove the redirect.
    pub async fn destroyed(&self, flow: Flow) {
        let Some(fe_port) = self.live().remove(&flow) else {
            return;
        };
        if let Err(e) = self.cfg.tables.forget_restored(flow) {
            tracing::warn!(error = %e, "cannot remove local delivery");
        }
        let fe = SocketAddr::from((*flow.local.ip(), fe_port));
        let notice = wire::encode(&self.cfg.key, &wire::envelope(Message::Closed(flow)));
        let sent = tokio::time::timeout(READ_TIMEOUT, async {
            let mut c = TcpStream::connect(fe).await?;
            write_message(&mut c, &notice).await?;
            c.shutdown().await
        })
        .await;
        match sent {
            Ok(Ok(())) => self.metrics().closed_sent.incr(),
            _ => {
                tracing::info!(%fe, client = %flow.client, "cannot tell the frontend a moved connection closed; its redirect expires on its own")
            }
        }
    }
}

const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\nconnection: close\r\nx-baton-error: upstream-refused\r\n\r\nlocal application unreachable\r\n";
