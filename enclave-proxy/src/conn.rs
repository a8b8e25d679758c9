//! One carried connection: a smoltcp TCP socket on one side, a link stream on the other.
//!
//! The stack task owns both and moves bytes between them without an intermediate buffer:
//! `socket.recv` hands its receive ring straight to the stream's `poll_write`, and `socket.send`
//! hands its free transmit ring straight to the stream's `poll_read`. Back-pressure is therefore
//! the TCP window: the stream is only read while the socket has send space, and the socket is
//! only drained while the stream accepts writes.
//!
//! Both ends wake the connection through one [`Waker`] that queues its socket handle for the
//! stack task: the stream registers it when a poll returns `Pending`, smoltcp when the socket's
//! receive or send state changes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use common::transport::Stream;
use common::wire::{Kind, Status, STATUS_LEN};
use smoltcp::socket::tcp::{self, State};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, Span};

use crate::packet::FlowKey;

/// Where a connection is. "app" is the enclave side (the smoltcp socket), "link" is host-proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The TCP handshake with the enclave kernel is under way (egress: SYN-ACK sent; ingress:
    /// SYN sent). Nothing moves yet.
    Connecting {
        /// When to give up.
        deadline: Instant,
    },
    /// Bytes move both ways ("link->app" and "app->link").
    Open,
    /// The link sent EOF, so a FIN is queued to the app; "app->link" still moves.
    LinkClosed,
    /// The app sent FIN, so the link is shut down for writing; "link->app" still moves.
    AppClosed,
    /// Both directions are finished; smoltcp is completing its close.
    Closing,
}

/// What the stack should do with a connection after servicing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep it; it will be woken again.
    Keep,
    /// Both directions closed cleanly.
    Done,
    /// It was reset (by the app, by a link error or by a time-out); drop the link.
    Reset,
    /// Ingress set-up failed: tell host-proxy this status, then close the link.
    Refuse(Status),
}

/// One carried connection.
#[derive(Debug)]
pub struct Conn {
    /// The link stream to host-proxy.
    pub link: Stream,
    /// The flow, as the enclave kernel sees it.
    pub key: FlowKey,
    /// Which way it was opened.
    pub kind: Kind,
    /// Where it is.
    pub state: ConnState,
    /// Wakes the stack for this connection.
    pub waker: Waker,
    /// The connection's tracing span.
    pub span: Span,
    /// Bytes of the ingress `ok` status still to write before any payload.
    status_left: usize,
    /// The app's FIN has been seen, so a later `Closed` is a graceful end, not a reset.
    app_fin: bool,
    /// Payload bytes link->app.
    pub to_app: u64,
    /// Payload bytes app->link.
    pub from_app: u64,
}

fn is_synchronized(state: State) -> bool {
    !matches!(
        state,
        State::Closed | State::Listen | State::SynSent | State::SynReceived
    )
}

impl Conn {
    /// A new connection in the `Connecting` state.
    pub fn new(
        link: Stream,
        key: FlowKey,
        kind: Kind,
        deadline: Instant,
        waker: Waker,
        span: Span,
    ) -> Conn {
        Conn {
            link,
            key,
            kind,
            state: ConnState::Connecting { deadline },
            waker,
            span,
            status_left: 0,
            app_fin: false,
            to_app: 0,
            from_app: 0,
        }
    }

    /// Moves whatever can move now. Never blocks; registers the waker wherever it would.
    pub fn pump(&mut self, socket: &mut tcp::Socket, now: Instant) -> Outcome {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        self.note_app_fin(socket);
        if let ConnState::Connecting { deadline } = self.state {
            match socket.state() {
                s if is_synchronized(s) => {
                    debug!(parent: &self.span, "enclave handshake complete");
                    self.state = ConnState::Open;
                    if self.kind == Kind::TcpIngress {
                        self.status_left = STATUS_LEN;
                    }
                }
                State::Closed => {
                    return match self.kind {
                        Kind::TcpIngress => Outcome::Refuse(Status::Refused),
                        Kind::TcpEgress => Outcome::Reset,
                    }
                }
                _ if now >= deadline => {
                    socket.abort();
                    return match self.kind {
                        Kind::TcpIngress => Outcome::Refuse(Status::TimedOut),
                        Kind::TcpEgress => Outcome::Reset,
                    };
                }
                _ => return Outcome::Keep,
            }
        }
        match self.write_status(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Pending => return Outcome::Keep,
            Poll::Ready(Err(e)) => return self.fail(socket, "link->host status", e),
        }
        if matches!(self.state, ConnState::Open | ConnState::LinkClosed) {
            if let Err(e) = self.app_to_link(socket, &mut cx) {
                return self.fail(socket, "app->link", e);
            }
        }
        if matches!(self.state, ConnState::Open | ConnState::AppClosed) {
            if let Err(e) = self.link_to_app(socket, &mut cx) {
                return self.fail(socket, "link->app", e);
            }
        }
        match socket.state() {
            State::Closed | State::TimeWait if self.state == ConnState::Closing => Outcome::Done,
            // A graceful close (LAST-ACK -> CLOSED) can leave data in the receive buffer that the
            // link has not taken yet: keep draining it.
            State::Closed if self.app_fin => Outcome::Keep,
            State::Closed => {
                debug!(parent: &self.span, state = ?self.state, unread = socket.recv_queue(), unsent = socket.send_queue(), "reset by the enclave side");
                Outcome::Reset
            }
            _ => Outcome::Keep,
        }
    }

    fn note_app_fin(&mut self, socket: &tcp::Socket) {
        if matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.app_fin = true;
        }
    }

    fn fail(&mut self, socket: &mut tcp::Socket, dir: &str, e: io::Error) -> Outcome {
        debug!(parent: &self.span, "{dir} failed, resetting: {e}");
        socket.abort();
        Outcome::Reset
    }

    /// Writes what is left of the ingress `ok` status.
    fn write_status(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let status = Status::Ok.encode();
        while self.status_left > 0 {
            let from = STATUS_LEN - self.status_left;
            match Pin::new(&mut self.link).poll_write(cx, &status[from..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.status_left -= n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drains the socket's receive buffer into the link; on the app's FIN, shuts the link down
    /// for writing.
    fn app_to_link(&mut self, socket: &mut tcp::Socket, cx: &mut Context<'_>) -> io::Result<()> {
        let link = &mut self.link;
        while socket.can_recv() {
            let written = socket.recv(|buf| match Pin::new(&mut *link).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => (n, Ok(n)),
                Poll::Ready(Err(e)) => (0, Err(e)),
                Poll::Pending => (0, Ok(0)),
            });
            match written {
                Ok(Ok(0)) | Err(_) => return Ok(()),
                Ok(Ok(n)) => self.from_app += n as u64,
                Ok(Err(e)) => return Err(e),
            }
        }
        if !socket.may_recv() {
            // Everything the app sent before its FIN has been written; pass the FIN on.
            match Pin::new(&mut self.link).poll_shutdown(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(r) => {
                    if let Err(e) = r {
                        debug!(parent: &self.span, "link shutdown(WR) failed: {e}");
                    }
                    debug!(parent: &self.span, bytes = self.from_app, "app->link finished");
                    self.state = match self.state {
                        ConnState::LinkClosed => ConnState::Closing,
                        _ => ConnState::AppClosed,
                    };
                }
            }
        }
        Ok(())
    }

    /// Fills the socket's send buffer from the link; on the link's EOF, queues a FIN to the app.
    fn link_to_app(&mut self, socket: &mut tcp::Socket, cx: &mut Context<'_>) -> io::Result<()> {
        let link = &mut self.link;
        while socket.can_send() {
            let read = socket.send(|buf| {
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut *link).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        (n, Ok(Some(n)))
                    }
                    Poll::Ready(Err(e)) => (0, Err(e)),
                    Poll::Pending => (0, Ok(None)),
                }
            });
            match read {
                Ok(Ok(Some(0))) => {
                    // EOF from the link: FIN after everything queued. Closing may take the
                    // socket from CLOSE-WAIT past LAST-ACK to CLOSED before the next look, so
                    // note the app's FIN first.
                    self.note_app_fin(socket);
                    socket.close();
                    debug!(parent: &self.span, bytes = self.to_app, "link->app finished");
                    self.state = match self.state {
                        ConnState::AppClosed => ConnState::Closing,
                        _ => ConnState::LinkClosed,
                    };
                    return Ok(());
                }
                Ok(Ok(Some(n))) => self.to_app += n as u64,
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{Loopback, Medium};
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint};

    /// One smoltcp interface over an in-memory loopback: the "app" socket listens, and the
    /// connection's socket connects to it, as ingress does; a Unix socket pair is the link.
    struct Rig {
        iface: Interface,
        device: Loopback,
        sockets: SocketSet<'static>,
        app: smoltcp::iface::SocketHandle,
        ours: smoltcp::iface::SocketHandle,
        conn: Conn,
        host: tokio::net::UnixStream,
        clock_ms: i64,
        /// The first outcome other than `Keep`: the stack drops the connection there.
        ended: Option<Outcome>,
    }

    impl Rig {
        fn new() -> Rig {
            let mut device = Loopback::new(Medium::Ethernet);
            let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
            let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
            });
            let mut sockets = SocketSet::new(vec![]);
            let app = sockets.add(crate::stack::new_socket(64 * 1024));
            let ours = sockets.add(crate::stack::new_socket(64 * 1024));
            sockets.get_mut::<tcp::Socket>(app).listen(8080).unwrap();
            let remote = IpEndpoint::new(IpAddress::v4(127, 0, 0, 1), 8080);
            let local = IpEndpoint::new(IpAddress::v4(127, 0, 0, 1), 40000);
            sockets
                .get_mut::<tcp::Socket>(ours)
                .connect(iface.context(), remote, local)
                .unwrap();
            let (link, host) = tokio::net::UnixStream::pair().unwrap();
            let conn = Conn::new(
                Stream::Unix(link),
                FlowKey {
                    local: remote,
                    remote: local,
                },
                Kind::TcpIngress,
                Instant::now() + std::time::Duration::from_secs(5),
                futures::task::noop_waker(),
                Span::none(),
            );
            Rig {
                iface,
                device,
                sockets,
                app,
                ours,
                conn,
                host,
                clock_ms: 0,
                ended: None,
            }
        }

        /// Polls the stack and pumps the connection a few times, as the stack would: never again
        /// after it has ended.
        async fn turn(&mut self) -> Outcome {
            if let Some(ended) = self.ended {
                return ended;
            }
            let mut outcome = Outcome::Keep;
            for _ in 0..8 {
                // smoltcp's clock moves past its delayed-ACK timer on every turn.
                self.clock_ms += 20;
                let now = smoltcp::time::Instant::from_millis(self.clock_ms);
                self.iface.poll(now, &mut self.device, &mut self.sockets);
                let socket = self.sockets.get_mut::<tcp::Socket>(self.ours);
                outcome = self.conn.pump(socket, Instant::now());
                if outcome != Outcome::Keep {
                    self.ended = Some(outcome);
                    break;
                }
                tokio::task::yield_now().await;
            }
            outcome
        }

        fn app(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(self.app)
        }

        async fn host_read(&mut self) -> Vec<u8> {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1024];
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.host.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            buf.truncate(n);
            buf
        }
    }

    #[tokio::test]
    async fn ingress_status_bytes_both_ways_and_half_close_each_way() {
        use tokio::io::AsyncWriteExt;
        let mut rig = Rig::new();
        assert_eq!(rig.turn().await, Outcome::Keep);
        assert_eq!(rig.conn.state, ConnState::Open);
        // The ok status reaches the host before any payload.
        assert_eq!(rig.host_read().await, Status::Ok.encode());

        rig.host.write_all(b"request").await.unwrap();
        rig.turn().await;
        let mut got = [0u8; 32];
        let n = rig.app().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], b"request");

        // The app answers and closes its side: the answer, then EOF, reach the host.
        rig.app().send_slice(b"answer").unwrap();
        rig.app().close();
        rig.turn().await;
        assert_eq!(rig.host_read().await, b"answer");
        assert_eq!(rig.host_read().await, b"", "app FIN becomes the link's EOF");
        assert_eq!(rig.conn.state, ConnState::AppClosed);

        // The host can still send after the app's FIN; then its EOF closes the connection.
        rig.host.write_all(b"late").await.unwrap();
        rig.turn().await;
        let n = rig.app().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], b"late");
        rig.host.shutdown().await.unwrap();
        let mut outcome = Outcome::Keep;
        for _ in 0..4 {
            outcome = rig.turn().await;
            if outcome != Outcome::Keep {
                break;
            }
        }
        assert_eq!(outcome, Outcome::Done);
        assert_eq!((rig.conn.to_app, rig.conn.from_app), (11, 6));
    }

    #[tokio::test]
    async fn a_refused_ingress_is_reported_as_refused() {
        let mut rig = Rig::new();
        // Nothing listens: the app socket is closed before the SYN arrives.
        rig.app().abort();
        let mut outcome = Outcome::Keep;
        for _ in 0..4 {
            outcome = rig.turn().await;
            if outcome != Outcome::Keep {
                break;
            }
        }
        assert_eq!(outcome, Outcome::Refuse(Status::Refused));
    }

    #[tokio::test]
    async fn data_the_link_has_not_taken_survives_a_graceful_close() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut rig = Rig::new();
        rig.turn().await;
        assert_eq!(rig.host_read().await, Status::Ok.encode());
        // The host does not read, so the link fills and the app's bytes wait in our socket.
        let chunk = vec![0x42u8; 16 * 1024];
        let mut sent = 0;
        for _ in 0..400 {
            if rig.app().send_queue() == 0 {
                sent += rig.app().send_slice(&chunk).unwrap();
            }
            rig.turn().await;
            if rig.sockets.get::<tcp::Socket>(rig.ours).recv_queue() > 0 {
                break;
            }
        }
        assert!(
            rig.sockets.get::<tcp::Socket>(rig.ours).recv_queue() > 0,
            "link never filled"
        );
        // Everything the app sent is now in our socket, so its FIN can follow at once.
        for _ in 0..20 {
            if rig.app().send_queue() == 0 {
                break;
            }
            rig.turn().await;
        }
        assert_eq!(rig.app().send_queue(), 0);
        // The app closes; the host closes; smoltcp goes CLOSE-WAIT -> LAST-ACK -> CLOSED while
        // bytes are still waiting for the link.
        rig.app().close();
        rig.turn().await;
        rig.host.shutdown().await.unwrap();
        for _ in 0..4 {
            rig.turn().await;
        }
        // Now the host reads: every byte arrives, then EOF, and the connection ends cleanly.
        let mut received = 0;
        let mut buf = vec![0u8; 256 * 1024];
        let mut outcome = Outcome::Keep;
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(200),
                rig.host.read(&mut buf),
            )
            .await
            {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => received += n,
                Ok(Err(e)) => panic!("link read failed: {e}"),
                // Ended without EOF: the stack would drop the link here, so nothing more comes.
                Err(_) if rig.ended.is_some() => break,
                Err(_) => {}
            }
            let o = rig.turn().await;
            if o != Outcome::Keep {
                outcome = o;
            }
        }
        assert_eq!(received, sent);
        if outcome == Outcome::Keep {
            outcome = rig.turn().await;
        }
        assert_eq!(outcome, Outcome::Done);
    }
}
