//! A TCP proxy that injects network faults between a client and a server.
//!
//! Clients connect to [`FaultProxy::addr`] instead of the server; the test switches
//! the [`ProxyMode`] at run time to model latency, partitions and crashes without
//! touching the host network. The proxy runs on its own thread with its own Tokio
//! runtime, so it works the same from sync tests and from any async runtime.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// What the proxy does with traffic. Switch with [`FaultProxy::set_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// Forward everything as is.
    #[default]
    Pass,
    /// Forward every chunk after `delay` plus a uniform random `0..=jitter`, in order.
    Latency {
        /// Fixed added delay per direction.
        delay: Duration,
        /// Upper bound of the random extra delay.
        jitter: Duration,
    },
    /// Refuse new connections (the listening socket is closed, so connects get
    /// `ECONNREFUSED`); established connections keep passing.
    Refuse,
    /// A partition: connections (old and new) stay open but every byte, both ways, is
    /// read and dropped. After switching back, the dropped bytes are gone.
    BlackHole,
    /// A partition that loses nothing: forwarding stops both ways (TCP back-pressure
    /// holds the bytes) and resumes, in order, when the mode changes.
    Stall,
    /// Reset (RST) every established connection, and every new one as it arrives.
    Reset,
}

struct Ctl {
    mode: watch::Sender<ProxyMode>,
    /// Bumped to reset every established connection.
    reset: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// A TCP proxy on `127.0.0.1:0` in front of one target address. Dropping it stops
/// the proxy and closes every connection through it.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    ctl: Arc<Ctl>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `target` (e.g. `server.addr().unwrap()` or `"127.0.0.1:2181"`).
    pub fn start(target: impl ToSocketAddrs) -> io::Result<FaultProxy> {
        let target = target
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no target address"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let ctl = Arc::new(Ctl {
            mode: watch::channel(ProxyMode::Pass).0,
            reset: watch::channel(0).0,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ctl2 = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(format!("latchkey-fault-proxy-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(_) => return,
                    };
                    accept_loop(listener, addr, target, ctl2, stop_rx).await;
                });
                // Dropping the runtime cancels every connection task: sockets close.
            })?;
        Ok(FaultProxy {
            addr,
            target,
            ctl,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address traffic is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.ctl.mode.borrow()
    }

    /// Switches the mode; takes effect at once for new and established connections.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.ctl.mode.send_replace(mode);
        if mode == ProxyMode::Reset {
            self.reset_connections();
        }
    }

    /// Back to [`ProxyMode::Pass`].
    pub fn pass(&self) {
        self.set_mode(ProxyMode::Pass)
    }

    /// [`ProxyMode::Latency`].
    pub fn latency(&self, delay: Duration, jitter: Duration) {
        self.set_mode(ProxyMode::Latency { delay, jitter })
    }

    /// [`ProxyMode::Refuse`].
    pub fn refuse(&self) {
        self.set_mode(ProxyMode::Refuse)
    }

    /// [`ProxyMode::BlackHole`].
    pub fn black_hole(&self) {
        self.set_mode(ProxyMode::BlackHole)
    }

    /// [`ProxyMode::Stall`].
    pub fn stall(&self) {
        self.set_mode(ProxyMode::Stall)
    }

    /// Resets (RST) every connection established now; the mode is unchanged.
    pub fn reset_connections(&self) {
        self.ctl.reset.send_modify(|n| *n += 1);
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.ctl.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since start.
    pub fn accepted_connections(&self) -> u64 {
        self.ctl.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rebind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    ctl: Arc<Ctl>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut mode_rx = ctl.mode.subscribe();
    let mut listener = Some(listener);
    loop {
        let mode = *mode_rx.borrow_and_update();
        if mode == ProxyMode::Refuse {
            listener = None;
            tokio::select! {
                _ = mode_rx.changed() => continue,
                _ = &mut stop => return,
            }
        }
        let Some(l) = listener.as_ref() else {
            match rebind(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    // The port is briefly unavailable: try again soon.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = &mut stop => return,
                    }
                }
            }
            continue;
        };
        tokio::select! {
            r = l.accept() => {
                if let Ok((client, _)) = r {
                    ctl.accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(handle(client, target, ctl.clone()));
                }
            }
            _ = mode_rx.changed() => {}
            _ = &mut stop => return,
        }
    }
}

/// SO_LINGER = 0: closing the socket sends RST instead of FIN.
fn set_reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid fd with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

struct OpenGuard(Arc<Ctl>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(mut client: TcpStream, target: SocketAddr, ctl: Arc<Ctl>) {
    let _ = client.set_nodelay(true);
    if *ctl.mode.borrow() == ProxyMode::Reset {
        set_reset_on_close(&client);
        return;
    }
    let mut reset_rx = ctl.reset.subscribe();
    reset_rx.borrow_and_update();
    let mut server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => {
            // The server is down: the client sees its connection reset.
            set_reset_on_close(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    ctl.open.fetch_add(1, Ordering::SeqCst);
    let _guard = OpenGuard(ctl.clone());
    let reset = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = pump(&mut cr, &mut sw, ctl.mode.subscribe());
        let down = pump(&mut sr, &mut cw, ctl.mode.subscribe());
        tokio::select! {
            _ = async { tokio::join!(up, down) } => false,
            _ = reset_rx.changed() => true,
        }
    };
    if reset {
        set_reset_on_close(&client);
        set_reset_on_close(&server);
    }
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(crate::process::pseudo_random() % (nanos + 1))
}

/// Copies one direction, applying the mode to every chunk.
async fn pump<R, W>(r: &mut R, w: &mut W, mut mode_rx: watch::Receiver<ProxyMode>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut last_due = Instant::now();
    let mut eof = false;
    loop {
        let mode = *mode_rx.borrow_and_update();
        let stalled = mode == ProxyMode::Stall;
        if eof && queue.is_empty() {
            let _ = w.shutdown().await;
            return;
        }
        let next_due = queue.front().map(|(d, _)| *d);
        tokio::select! {
            r = r.read(&mut buf), if !eof && !stalled && queue.len() < 4096 => {
                let n = match r {
                    Ok(0) | Err(_) => { eof = true; continue; }
                    Ok(n) => n,
                };
                let now = Instant::now();
                // The mode as of now, not as of when the read started: a switch
                // made while this read waited applies to the bytes it returns.
                let mode = *mode_rx.borrow_and_update();
                match mode {
                    ProxyMode::BlackHole => {}
                    ProxyMode::Latency { delay, jitter: j } => {
                        // Never reorder: a chunk is due no earlier than the previous one.
                        let due = (now + delay + jitter(j)).max(last_due);
                        last_due = due;
                        queue.push_back((due, buf[..n].to_vec()));
                    }
                    _ if queue.is_empty() => {
                        if w.write_all(&buf[..n]).await.is_err() { return; }
                    }
                    _ => {
                        let due = now.max(last_due);
                        last_due = due;
                        queue.push_back((due, buf[..n].to_vec()));
                    }
                }
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() && !stalled => {
                let (_, chunk) = queue.pop_front().expect("queue not empty");
                let mode = *mode_rx.borrow_and_update();
                if mode == ProxyMode::Stall {
                    queue.push_front((Instant::now(), chunk));
                    continue;
                }
                if mode != ProxyMode::BlackHole && w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            r = mode_rx.changed() => {
                if r.is_err() { return; }
            }
        }
    }
}
