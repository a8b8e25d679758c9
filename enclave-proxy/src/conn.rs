//! One carried connection: a smoltcp TCP socket on one side, a framed link stream on the other.
//!
//! The stack task owns both and moves bytes between them through one scratch buffer it lends to
//! every connection in turn (so an idle connection holds no buffer of its own):
//! - "app->link": the socket's received bytes are copied from its ring into DATA frames of at
//!   most one capped link write each, and dequeued only once the link took them; no more than
//!   the window allows (see [`common::frame`]): with the window closed they wait in the ring,
//!   whose TCP window then closes toward the app. The app's FIN becomes a FIN frame once
//!   everything before it is written. CREDITs for "link->app" go out between frames.
//! - "link->app": frames read from the link are decoded ([`common::frame::Deframer`]) and their
//!   payload queued on the socket. The link is read whenever it has bytes, so CREDITs never
//!   wait behind data: payload the socket has no room for waits in a backlog, which the window
//!   bounds (host-proxy's credit is returned only as payload reaches the socket). A FIN frame
//!   closes the socket's sending half once the backlog before it is queued.
//!
//! How a connection ends (see [`common::frame`] for the link side):
//! - FIN both ways and the socket closed: [`Outcome::Done`].
//! - The app resets, or smoltcp gives up: what the socket had received still goes to the link,
//!   bounded by [`DRAIN_LIMIT`], then a RST frame: [`Outcome::Reset`].
//! - A RST frame, a malformed frame, a link error, or a link that ends before both FINs crossed
//!   (host-proxy died): the socket is aborted, so the app sees a reset, never a clean close.
//!
//! Both ends wake the connection through one [`Waker`] that queues its socket handle for the
//! stack task: the stream registers it when a poll returns `Pending`, smoltcp when the socket's
//! receive or send state changes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::frame::{self, Backlog, Chunk, Deframer, End, SendWindow, FRAME_HEADER_LEN};
use common::transport::Stream;
use common::wire::{Kind, Status, STATUS_LEN};
use smoltcp::socket::tcp::{self, State};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, Span};

use crate::packet::FlowKey;

/// How long a connection whose socket has closed may take to hand what it received to the link.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// How much a connection copies to try a link that was full at its last write.
const PROBE_LEN: usize = 2048;

/// The scratch buffer a connection is lent while it is pumped: a full link write, or a read.
pub const SCRATCH_LEN: usize = 64 * 1024;

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
    /// The link sent FIN, so a FIN is queued to the app; "app->link" still moves.
    LinkClosed,
    /// The app sent FIN and the link has its FIN frame; "link->app" still moves.
    AppClosed,
    /// Both directions are finished; smoltcp is completing its close.
    Closing,
    /// The socket closed (the app reset it, or smoltcp gave up) before both directions finished:
    /// what it received still goes to the link until `deadline`, then the link gets a RST.
    Draining {
        /// When to stop waiting for the link.
        deadline: Instant,
    },
}

/// What the stack should do with a connection after servicing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep it; it will be woken again.
    Keep,
    /// Both directions closed cleanly.
    Done,
    /// It was reset (by the app, by the link, by a time-out); the socket is aborted, drop the
    /// link.
    Reset,
    /// Ingress set-up failed: tell host-proxy this status, then close the link.
    Refuse(Status),
}

/// The frame being written app->link: header bytes not yet written, and payload bytes still in
/// the socket's receive ring.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    header: [u8; FRAME_HEADER_LEN],
    header_at: usize,
    data_left: usize,
    /// The frame is the FIN.
    fin: bool,
    /// The frame is a CREDIT.
    credit: bool,
}

impl Outgoing {
    fn idle() -> Outgoing {
        Outgoing {
            header_at: FRAME_HEADER_LEN,
            ..Outgoing::frame([0; FRAME_HEADER_LEN], 0)
        }
    }

    /// A frame to write whole: `header`, then `data_left` bytes from the socket's ring.
    fn frame(header: [u8; FRAME_HEADER_LEN], data_left: usize) -> Outgoing {
        Outgoing {
            header,
            header_at: 0,
            data_left,
            fin: header == frame::FIN,
            credit: false,
        }
    }

    fn busy(&self) -> bool {
        self.header_at < FRAME_HEADER_LEN || self.data_left > 0
    }
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
    out: Outgoing,
    /// The FIN frame has been written whole.
    fin_sent: bool,
    /// The link's last write would have blocked: the next try copies only a little, since the
    /// wake-up may have come from the socket, not from the link.
    link_full: bool,
    incoming: Deframer,
    /// What the window toward host-proxy allows.
    window: SendWindow,
    /// Payload from the link the socket had no room for.
    backlog: Backlog,
    /// The link ended after its FIN: only the backlog is left to queue.
    link_ended: bool,
    /// Something from the link opened the window or made a CREDIT due: "app->link" runs again.
    poke: bool,
    /// A CREDIT could not be written: host-proxy has closed the link, so none is sent again.
    credits_off: bool,
    /// The link's FIN has been passed to the socket.
    link_fin: bool,
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

fn eof(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
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
            out: Outgoing::idle(),
            fin_sent: false,
            link_full: false,
            incoming: Deframer::new(),
            window: SendWindow::default(),
            backlog: Backlog::default(),
            link_ended: false,
            poke: false,
            credits_off: false,
            link_fin: false,
            app_fin: false,
            to_app: 0,
            from_app: 0,
        }
    }

    /// Bytes from the link waiting for room in the socket's send buffer.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// When the connection must be looked at even if nothing wakes it.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            ConnState::Connecting { deadline } | ConnState::Draining { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Moves whatever can move now, through `scratch` (at least [`SCRATCH_LEN`] bytes). Never
    /// blocks; registers the waker wherever it would.
    pub fn pump(&mut self, socket: &mut tcp::Socket, now: Instant, scratch: &mut [u8]) -> Outcome {
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
                        // Egress (and DNS over TCP), which the app opened.
                        _ => Outcome::Reset,
                    };
                }
                // An egress socket reset in SYN-RECEIVED falls back to LISTEN on its
                // destination, where it could catch another flow's replayed SYN: abort it.
                State::Listen => {
                    debug!(parent: &self.span, "reset during the enclave handshake");
                    socket.abort();
                    return Outcome::Reset;
                }
                _ if now >= deadline => {
                    socket.abort();
                    return match self.kind {
                        Kind::TcpIngress => Outcome::Refuse(Status::TimedOut),
                        _ => Outcome::Reset,
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
        if let Err(e) = self.app_to_link(socket, &mut cx, scratch) {
            return self.fail(socket, "app->link", e);
        }
        match self.link_to_app(socket, &mut cx, scratch) {
            Ok(None) => {}
            Ok(Some(outcome)) => return outcome,
            Err(e) => return self.fail(socket, "link->app", e),
        }
        if std::mem::take(&mut self.poke) {
            if let Err(e) = self.app_to_link(socket, &mut cx, scratch) {
                return self.fail(socket, "app->link", e);
            }
        }
        self.settle(socket, &mut cx, now)
    }

    /// Decides whether the connection is over, once both directions have moved what they can.
    fn settle(&mut self, socket: &mut tcp::Socket, cx: &mut Context<'_>, now: Instant) -> Outcome {
        if !matches!(socket.state(), State::Closed | State::TimeWait) {
            return Outcome::Keep;
        }
        if self.fin_sent && self.link_fin {
            return Outcome::Done;
        }
        // The socket closed before both directions finished: the app reset it (or smoltcp gave
        // up on it). What it received before still goes to the link, then a RST.
        let delivered =
            socket.recv_queue() == 0 && !self.out.busy() && (self.fin_sent || !self.app_fin);
        if delivered {
            debug!(parent: &self.span, state = ?self.state, unsent = socket.send_queue(), "reset by the enclave side");
            // One try: if the link cannot take four bytes now, closing it says the same.
            let _ = Pin::new(&mut self.link).poll_write(cx, &frame::RST);
            return Outcome::Reset;
        }
        let deadline = match self.state {
            ConnState::Draining { deadline } => deadline,
            _ => {
                let deadline = now + DRAIN_LIMIT;
                self.state = ConnState::Draining { deadline };
                deadline
            }
        };
        if now >= deadline {
            debug!(parent: &self.span, unread = socket.recv_queue(), "link did not take the rest in time");
            return Outcome::Reset;
        }
        Outcome::Keep
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

    /// Frames the socket's received bytes onto the link; after the app's FIN and everything
    /// before it, a FIN frame.
    fn app_to_link(
        &mut self,
        socket: &mut tcp::Socket,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
    ) -> io::Result<()> {
        loop {
            if self.out.busy() {
                let header = &self.out.header[self.out.header_at..];
                let h = header.len();
                scratch[..h].copy_from_slice(header);
                let want = if self.link_full {
                    self.out.data_left.min(PROBE_LEN)
                } else {
                    self.out.data_left
                };
                // The payload stays in the ring until the link takes it: a copy, not a dequeue.
                let d = socket.peek_slice(&mut scratch[h..h + want]).unwrap_or(0);
                if d < want {
                    // Bytes counted into the frame are gone from the ring: the socket was reset
                    // under us. The frame cannot be finished; closing the link cuts it.
                    return Err(eof("receive buffer emptied inside a frame"));
                }
                let n = match Pin::new(&mut self.link).poll_write(cx, &scratch[..h + d]) {
                    Poll::Pending => {
                        self.link_full = true;
                        return Ok(());
                    }
                    // host-proxy closes the link once both FINs have crossed, which may be
                    // before this side has read its FIN: a CREDIT it no longer needs can fail.
                    // Whether the stream ended cleanly is for the reading side to see.
                    Poll::Ready(Err(_)) if self.out.credit => {
                        self.out = Outgoing::idle();
                        self.credits_off = true;
                        return Ok(());
                    }
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => n,
                };
                self.link_full = false;
                let from_header = n.min(h);
                self.out.header_at += from_header;
                let payload = n - from_header;
                discard(socket, payload);
                self.out.data_left -= payload;
                self.from_app += payload as u64;
                if !self.out.busy() && self.out.fin {
                    self.fin_sent = true;
                    debug!(parent: &self.span, bytes = self.from_app, "app->link finished");
                    self.state = match self.state {
                        ConnState::LinkClosed => ConnState::Closing,
                        ConnState::Open => ConnState::AppClosed,
                        other => other,
                    };
                }
                continue;
            }
            if let Some(credit) = self.incoming.credit_due().filter(|_| !self.credits_off) {
                self.out = Outgoing {
                    credit: true,
                    ..Outgoing::frame(credit, 0)
                };
                continue;
            }
            if self.fin_sent {
                return Ok(());
            }
            let queued = socket.recv_queue();
            if queued > 0 {
                // A closed window: the bytes wait in the ring; a CREDIT from the link reopens it.
                let len = queued.min(self.window.room());
                if len == 0 {
                    return Ok(());
                }
                self.window.sent(len);
                self.out = Outgoing::frame(frame::data_header(len), len);
                continue;
            }
            if self.app_fin {
                self.out = Outgoing::frame(frame::FIN, 0);
                continue;
            }
            return Ok(());
        }
    }

    /// Queues what the socket has room for of the backlog; once it is empty after the link's
    /// FIN, closes the socket's sending half.
    fn hand_on(&mut self, socket: &mut tcp::Socket) {
        while !self.backlog.is_empty() {
            let n = socket.send_slice(self.backlog.front()).unwrap_or(0);
            if n == 0 {
                return;
            }
            self.backlog.consume(n);
            self.delivered(n);
        }
        if self.incoming.end() == End::Fin && !self.link_fin {
            // Closing may take the socket from CLOSE-WAIT past LAST-ACK to CLOSED before the
            // next look, so note the app's FIN first.
            self.note_app_fin(socket);
            socket.close();
            self.link_fin = true;
            debug!(parent: &self.span, bytes = self.to_app, "link->app finished");
            self.state = match self.state {
                ConnState::AppClosed => ConnState::Closing,
                ConnState::Open => ConnState::LinkClosed,
                other => other,
            };
        }
    }

    fn delivered(&mut self, n: usize) {
        self.incoming.delivered(n);
        self.to_app += n as u64;
        self.poke = true;
    }

    /// Reads and decodes everything the link has, queueing payload on the socket (or in the
    /// backlog) and applying CREDITs. Returns an outcome when the link ended the connection.
    fn link_to_app(
        &mut self,
        socket: &mut tcp::Socket,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
    ) -> io::Result<Option<Outcome>> {
        loop {
            self.hand_on(socket);
            if self.link_ended {
                return Ok(None);
            }
            let both_fins = self.incoming.end() == End::Fin && self.fin_sent;
            // While the socket has room and nothing waits, read no more than it takes (plus the
            // next header), so payload goes straight to the socket, copied once. Once it is
            // full, read everything: CREDITs behind the data must not wait for the app.
            let room = socket.send_capacity() - socket.send_queue();
            let limit = if self.backlog.is_empty() && room > 0 && !self.link_fin {
                (room + self.incoming.header_left()).min(scratch.len())
            } else {
                scratch.len()
            };
            let mut rb = ReadBuf::new(&mut scratch[..limit]);
            match Pin::new(&mut self.link).poll_read(cx, &mut rb) {
                Poll::Pending => return Ok(None),
                // Once both FINs have crossed, host-proxy may close the link without reading
                // the last CREDITs, which a Unix socket reports as a reset: the stream is over.
                Poll::Ready(Err(_)) if both_fins => {
                    self.link_ended = true;
                    continue;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                if both_fins {
                    self.link_ended = true;
                    continue;
                }
                return Err(eof(if self.incoming.mid_frame() {
                    "link ended inside a frame"
                } else {
                    "link ended without FIN"
                }));
            }
            let mut at = 0;
            while at < n {
                let (used, chunk) = self
                    .incoming
                    .decode(&scratch[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                at += used;
                match chunk {
                    Some(Chunk::Data(k)) => {
                        let mut payload = &scratch[at - k..at];
                        if self.backlog.is_empty() {
                            let queued = socket.send_slice(payload).unwrap_or(0);
                            payload = &payload[queued..];
                            self.delivered(queued);
                        }
                        self.backlog.push(payload);
                    }
                    Some(Chunk::Credit(amount)) => {
                        self.window
                            .credited(amount)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        self.poke = true;
                    }
                    Some(Chunk::Rst) => {
                        debug!(parent: &self.span, "reset by the host side");
                        socket.abort();
                        return Ok(Some(Outcome::Reset));
                    }
                    // Passed on once the backlog before it is queued.
                    // (A byte stream's decoder yields no datagrams.)
                    Some(Chunk::Fin | Chunk::Datagram { .. }) | None => {}
                }
            }
        }
    }
}

/// Dequeues `n` bytes the link has taken from the socket's receive ring (in up to two pieces
/// when they wrap around its end).
fn discard(socket: &mut tcp::Socket, mut n: usize) {
    while n > 0 {
        match socket.recv(|buf| {
            let k = buf.len().min(n);
            (k, k)
        }) {
            Ok(0) | Err(_) => return,
            Ok(k) => n -= k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use common::frame::encode_all;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{Loopback, Medium};
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A waker that only records that it was woken: the rig pumps the connection only then, as
    /// the stack does, so a connection that is never woken again shows up as one that never ends.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// One smoltcp interface over an in-memory loopback: the "app" socket listens, and the
    /// connection's socket connects to it, as ingress does; a Unix socket pair is the link.
    struct Rig {
        iface: Interface,
        device: Loopback,
        sockets: SocketSet<'static>,
        app: smoltcp::iface::SocketHandle,
        ours: smoltcp::iface::SocketHandle,
        conn: Conn,
        woken: Arc<Flag>,
        host: tokio::net::UnixStream,
        /// Decodes what the host side reads.
        from_link: Deframer,
        scratch: Vec<u8>,
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
            let woken = Arc::new(Flag(AtomicBool::new(true)));
            let conn = Conn::new(
                Stream::unix(link).unwrap(),
                FlowKey {
                    local: remote,
                    remote: local,
                },
                Kind::TcpIngress,
                Instant::now() + std::time::Duration::from_secs(5),
                Waker::from(woken.clone()),
                Span::none(),
            );
            Rig {
                iface,
                device,
                sockets,
                app,
                ours,
                conn,
                woken,
                host,
                from_link: Deframer::new(),
                scratch: vec![0u8; SCRATCH_LEN],
                clock_ms: 0,
                ended: None,
            }
        }

        /// A rig whose connection is open and whose `ok` status the host has read.
        async fn open() -> Rig {
            let mut rig = Rig::new();
            assert_eq!(rig.turn().await, Outcome::Keep);
            assert_eq!(rig.conn.state, ConnState::Open);
            let mut status = [0u8; STATUS_LEN];
            rig.host.read_exact(&mut status).await.unwrap();
            assert_eq!(status, Status::Ok.encode(), "ok comes before any payload");
            rig
        }

        /// Polls the stack and services the connection a few times, as the stack would: only
        /// when its waker fired, and never again after it has ended (the stack aborts the
        /// socket then, which these polls still carry to the app).
        async fn turn(&mut self) -> Outcome {
            let mut outcome = self.ended.unwrap_or(Outcome::Keep);
            for _ in 0..8 {
                // smoltcp's clock moves past its delayed-ACK timer on every turn.
                self.clock_ms += 20;
                let now = smoltcp::time::Instant::from_millis(self.clock_ms);
                self.iface.poll(now, &mut self.device, &mut self.sockets);
                if self.ended.is_none() && self.woken.0.swap(false, Ordering::SeqCst) {
                    let socket = self.sockets.get_mut::<tcp::Socket>(self.ours);
                    outcome = self.conn.pump(socket, Instant::now(), &mut self.scratch);
                    if outcome == Outcome::Keep {
                        socket.register_recv_waker(&self.conn.waker);
                        socket.register_send_waker(&self.conn.waker);
                    } else {
                        self.ended = Some(outcome);
                    }
                }
                tokio::task::yield_now().await;
            }
            outcome
        }

        /// Turns until the connection ends; panics if it is still there after many turns.
        async fn end(&mut self) -> Outcome {
            for _ in 0..20 {
                let o = self.turn().await;
                if o != Outcome::Keep {
                    // A few more polls carry the socket's last segments to the app.
                    self.turn().await;
                    return o;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("connection never ended: {:?}", self.conn.state);
        }

        fn app(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(self.app)
        }

        /// Reads what the host has been sent so far: payload, and how the direction ended. The
        /// host returns credit as it reads, as host-proxy does.
        async fn host_frames(&mut self) -> (Vec<u8>, End) {
            let mut payload = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let read = tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    self.host.read(&mut buf),
                );
                let n = match read.await {
                    Ok(Ok(n)) => n,
                    Ok(Err(_)) | Err(_) => break,
                };
                if n == 0 {
                    break;
                }
                let mut at = 0;
                while at < n {
                    let (used, chunk) = self.from_link.decode(&buf[at..n]).unwrap();
                    if let Some(Chunk::Data(k)) = chunk {
                        payload.extend_from_slice(&buf[at + used - k..at + used]);
                        self.from_link.delivered(k);
                    }
                    at += used;
                }
                if let Some(credit) = self.from_link.credit_due() {
                    self.host.write_all(&credit).await.unwrap();
                }
                if self.from_link.end() != End::Open {
                    break;
                }
            }
            (payload, self.from_link.end())
        }

        /// Writes `bytes` as the host, turning the stack whenever the link is full, until all
        /// are written or the connection has ended.
        async fn host_push(&mut self, bytes: &[u8]) {
            let mut at = 0;
            while at < bytes.len() && self.ended.is_none() {
                match self.host.try_write(&bytes[at..]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.turn().await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }

        async fn host_send(&mut self, payload: &[u8], end: Option<Chunk>) {
            self.host
                .write_all(&encode_all(payload, end))
                .await
                .unwrap();
        }

        /// Whether the app saw its connection reset rather than closed. In these tests the app
        /// never closes after the link's FIN, so a graceful end leaves it in CLOSE-WAIT,
        /// FIN-WAIT-2 or TIME-WAIT; only a RST takes it to CLOSED (or back to LISTEN).
        fn app_was_reset(&mut self) -> bool {
            matches!(self.app().state(), State::Closed | State::Listen)
        }
    }

    #[tokio::test]
    async fn ingress_status_bytes_both_ways_and_half_close_each_way() {
        let mut rig = Rig::open().await;
        rig.host_send(b"request", None).await;
        rig.turn().await;
        let mut got = [0u8; 32];
        let n = rig.app().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], b"request");

        // The app answers and closes its side: the answer, then FIN, reach the host.
        rig.app().send_slice(b"answer").unwrap();
        rig.app().close();
        rig.turn().await;
        assert_eq!(rig.host_frames().await, (b"answer".to_vec(), End::Fin));
        assert_eq!(rig.conn.state, ConnState::AppClosed);

        // The host can still send after the app's FIN; then its FIN closes the connection.
        rig.host_send(b"late", Some(Chunk::Fin)).await;
        rig.turn().await;
        let n = rig.app().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], b"late");
        assert_eq!(rig.end().await, Outcome::Done);
        assert_eq!((rig.conn.to_app, rig.conn.from_app), (11, 6));
    }

    #[tokio::test]
    async fn a_refused_ingress_is_reported_as_refused() {
        let mut rig = Rig::new();
        // Nothing listens: the app socket is closed before the SYN arrives.
        rig.app().abort();
        assert_eq!(rig.end().await, Outcome::Refuse(Status::Refused));
    }

    #[tokio::test]
    async fn data_the_link_has_not_taken_survives_a_graceful_close() {
        let mut rig = Rig::open().await;
        // The host does not read, so the link fills and the app's bytes wait in our socket.
        let chunk = vec![0x42u8; 16 * 1024];
        let mut sent = 0;
        // The window closes after 4 MiB, so this takes a few hundred turns.
        for _ in 0..4000 {
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
        rig.host_send(b"", Some(Chunk::Fin)).await;
        for _ in 0..4 {
            rig.turn().await;
        }
        // Now the host reads: every byte arrives, then FIN, and the connection ends cleanly.
        let mut received = 0;
        loop {
            let (payload, end) = rig.host_frames().await;
            received += payload.len();
            if end != End::Open {
                assert_eq!(end, End::Fin);
                break;
            }
            rig.turn().await;
        }
        assert_eq!(received, sent);
        assert_eq!(rig.end().await, Outcome::Done);
    }

    /// An app that trickles single bytes toward a host that has stopped reading puts at most
    /// `WINDOW_FRAMES` frames on the link; the rest waits in the socket and leaves as one frame
    /// once credit returns.
    #[tokio::test]
    async fn a_trickle_under_back_pressure_stops_at_the_window_then_coalesces() {
        let mut rig = Rig::open().await;
        let total = 3 * frame::WINDOW_FRAMES;
        for _ in 0..total {
            rig.app().send_slice(b"x").unwrap();
            rig.turn().await;
        }
        // Read the link without returning credit, as a host whose client stopped reading.
        let mut sizes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut deframer = Deframer::new();
        let quiet = std::time::Duration::from_millis(100);
        while let Ok(n) = tokio::time::timeout(quiet, rig.host.read(&mut buf)).await {
            let n = n.unwrap();
            let mut at = 0;
            while at < n {
                let (used, chunk) = deframer.decode(&buf[at..n]).unwrap();
                if let Some(Chunk::Data(k)) = chunk {
                    sizes.push(k);
                }
                at += used;
            }
        }
        assert_eq!(sizes.len(), frame::WINDOW_FRAMES, "{sizes:?}");
        let crossed: usize = sizes.iter().sum();
        assert_eq!(crossed, frame::WINDOW_FRAMES, "one byte per turn");
        let ours = rig.sockets.get::<tcp::Socket>(rig.ours);
        assert_eq!(
            ours.recv_queue(),
            total - crossed,
            "the rest waits in the socket"
        );
        // Credit returns: everything that waited leaves as one frame.
        rig.host
            .write_all(&frame::credit(frame::WINDOW))
            .await
            .unwrap();
        rig.turn().await;
        let n = rig.host.read(&mut buf).await.unwrap();
        assert_eq!(n, FRAME_HEADER_LEN + total - crossed);
        assert_eq!(buf[..FRAME_HEADER_LEN], frame::data_header(total - crossed));
    }

    /// What the app does not read waits in a backlog while the link is read on: the host's
    /// CREDITs never wait behind its data. Credit for payload follows the app's reading, and a
    /// host past the window is reset.
    #[tokio::test]
    async fn the_link_is_read_while_the_app_is_not_and_credit_follows_delivery() {
        let mut rig = Rig::open().await;
        let payload: Vec<u8> = (0..frame::WINDOW / common::transport::MAX_WRITE * frame::MAX_DATA)
            .map(|i| i as u8)
            .collect();
        let frames = encode_all(&payload, None);
        assert_eq!(frames.len(), frame::WINDOW, "exactly a full window");
        rig.host_push(&frames).await;
        rig.turn().await;
        // The socket (64 KiB) is full; the rest of the window waits here, and only the frames'
        // overhead is owed: no CREDIT yet.
        assert!(rig.conn.backlog.len() >= payload.len() - 2 * 64 * 1024);
        let (got, end) = rig.host_frames().await;
        assert_eq!((got.len(), end), (0, End::Open));
        let mut read = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut credits = Vec::new();
        let mut deframer = Deframer::new();
        while read.len() < payload.len() {
            let n = rig.app().recv_slice(&mut buf).unwrap();
            read.extend_from_slice(&buf[..n]);
            rig.turn().await;
            let mut link = vec![0u8; 64];
            while let Ok(Ok(n)) = tokio::time::timeout(
                std::time::Duration::from_millis(5),
                rig.host.read(&mut link),
            )
            .await
            {
                let (used, chunk) = deframer.decode(&link[..n]).unwrap();
                assert_eq!(used, n);
                let Some(Chunk::Credit(c)) = chunk else {
                    panic!("{chunk:?}");
                };
                credits.push(c);
            }
        }
        assert!(read == payload);
        let returned: usize = credits.iter().sum();
        assert!(
            returned > frame::WINDOW - frame::CREDIT_EVERY
                && credits.iter().all(|&c| c >= frame::CREDIT_EVERY),
            "{credits:?}"
        );
        // Two more windows, with the app no longer reading and the CREDITs ignored, is too much.
        rig.host_push(&[&frames[..], &frames[..]].concat()).await;
        assert_eq!(rig.end().await, Outcome::Reset);
        assert!(rig.app_was_reset());
    }

    // Every close order ends the connection (the stack then drops it), and a reset on one side
    // is a reset on the other.

    #[tokio::test]
    async fn link_fin_first_then_app_fin() {
        let mut rig = Rig::open().await;
        rig.host_send(b"bye", Some(Chunk::Fin)).await;
        rig.turn().await;
        assert_eq!(rig.conn.state, ConnState::LinkClosed);
        let mut got = [0u8; 8];
        assert_eq!(rig.app().recv_slice(&mut got), Ok(3));
        rig.app().send_slice(b"ok").unwrap();
        rig.app().close();
        assert_eq!(rig.end().await, Outcome::Done);
        assert_eq!(rig.host_frames().await, (b"ok".to_vec(), End::Fin));
    }

    #[tokio::test]
    async fn app_reset_reaches_the_host_as_rst_after_its_data() {
        let mut rig = Rig::open().await;
        rig.app().send_slice(b"partial").unwrap();
        rig.turn().await;
        rig.app().abort();
        assert_eq!(rig.end().await, Outcome::Reset);
        assert_eq!(rig.host_frames().await, (b"partial".to_vec(), End::Rst));
    }

    /// The leak of the issue: the app sends FIN and then RST while the link is still open.
    #[tokio::test]
    async fn app_fin_then_rst_while_the_link_is_open() {
        let mut rig = Rig::open().await;
        rig.app().send_slice(b"last words").unwrap();
        rig.app().close();
        rig.turn().await;
        assert_eq!(rig.conn.state, ConnState::AppClosed);
        // The host keeps sending; the app resets instead of reading.
        rig.host_send(&[7u8; 1000], None).await;
        rig.turn().await;
        rig.app().abort();
        assert_eq!(rig.end().await, Outcome::Reset);
        assert_eq!(rig.host_frames().await, (b"last words".to_vec(), End::Rst));
    }

    #[tokio::test]
    async fn host_rst_resets_the_app() {
        let mut rig = Rig::open().await;
        rig.host_send(b"some", Some(Chunk::Rst)).await;
        assert_eq!(rig.end().await, Outcome::Reset);
        assert!(rig.app_was_reset());
    }

    #[tokio::test]
    async fn host_rst_after_its_fin_resets_the_app() {
        let mut rig = Rig::open().await;
        rig.host_send(b"x", Some(Chunk::Fin)).await;
        rig.turn().await;
        assert_eq!(rig.conn.state, ConnState::LinkClosed);
        rig.host.write_all(&frame::RST).await.unwrap();
        assert_eq!(rig.end().await, Outcome::Reset);
        assert!(rig.app_was_reset());
    }

    #[tokio::test]
    async fn a_malformed_frame_resets_the_app() {
        let mut rig = Rig::open().await;
        rig.host.write_all(&[1, 0, 0, 0]).await.unwrap();
        assert_eq!(rig.end().await, Outcome::Reset);
        assert!(rig.app_was_reset());
    }

    /// host-proxy dying (the link ends without FIN) resets the app in every state, even
    /// mid-frame, and after either side's FIN.
    #[tokio::test]
    async fn link_death_in_every_state_resets_the_app() {
        #[derive(Debug, Clone, Copy)]
        enum Before {
            Connecting,
            Open,
            MidFrame,
            AppFin,
            LinkFin,
        }
        for before in [
            Before::Connecting,
            Before::Open,
            Before::MidFrame,
            Before::AppFin,
            Before::LinkFin,
        ] {
            let mut rig = if matches!(before, Before::Connecting) {
                Rig::new()
            } else {
                Rig::open().await
            };
            match before {
                Before::Connecting | Before::Open => {}
                Before::MidFrame => rig.host.write_all(&[1, 0, 0, 9, b'a']).await.unwrap(),
                Before::AppFin => {
                    rig.app().close();
                    rig.turn().await;
                    assert_eq!(rig.conn.state, ConnState::AppClosed);
                }
                Before::LinkFin => {
                    rig.host_send(b"", Some(Chunk::Fin)).await;
                    rig.turn().await;
                    assert_eq!(rig.conn.state, ConnState::LinkClosed);
                }
            }
            // host-proxy is killed: its end of the link closes without a FIN.
            let (_, dead) = tokio::net::UnixStream::pair().unwrap();
            drop(std::mem::replace(&mut rig.host, dead));
            assert_eq!(rig.end().await, Outcome::Reset, "{before:?}");
            assert!(rig.app_was_reset(), "{before:?}: app saw a clean close");
        }
    }

    /// An egress socket that falls back to LISTEN during set-up (a RST in SYN-RECEIVED) would
    /// catch the next replayed SYN for its destination: it is aborted, never reused.
    #[tokio::test]
    async fn an_egress_socket_back_in_listen_is_aborted() {
        let mut socket = crate::stack::new_socket(4096);
        socket
            .listen(IpEndpoint::new(IpAddress::v4(10, 0, 0, 9), 80))
            .unwrap();
        let (link, _host) = tokio::net::UnixStream::pair().unwrap();
        let key = FlowKey {
            local: IpEndpoint::new(IpAddress::v4(10, 240, 0, 2), 40000),
            remote: IpEndpoint::new(IpAddress::v4(10, 0, 0, 9), 80),
        };
        let mut conn = Conn::new(
            Stream::unix(link).unwrap(),
            key,
            Kind::TcpEgress,
            Instant::now() + std::time::Duration::from_secs(5),
            futures::task::noop_waker(),
            Span::none(),
        );
        let mut scratch = vec![0u8; SCRATCH_LEN];
        assert_eq!(
            conn.pump(&mut socket, Instant::now(), &mut scratch),
            Outcome::Reset
        );
        assert_eq!(socket.state(), State::Closed);
    }
}
