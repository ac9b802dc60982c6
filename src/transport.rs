//! Where the protocol's bytes travel: stdin/stdout, or a serial tty opened raw.
//!
//! A serial link is shared by a [`Reader`] (one thread, blocking on input) and any number of
//! [`Writer`] clones. Device loss (USB unplug, the peer of a pty closing) is a typed error for
//! writers; the reader notices it too, logs it, reopens the device with backoff and reports
//! [`Received::Reconnected`]. Nothing here exits on a transient error.
//!
//! Writes are blocking and unbuffered beyond the kernel's tty queue: a slow or flow-stopped
//! link stalls the writer (and so generation) instead of growing memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Serial flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowControl {
    /// None (the default: three-wire TX/RX/GND).
    None,
    /// Software flow control: XON/XOFF bytes, handled by the kernel.
    XonXoff,
    /// Hardware flow control on the RTS/CTS lines.
    RtsCts,
}

impl FlowControl {
    /// Every kind, by the name `--flow` takes.
    pub const ALL: [FlowControl; 3] =
        [FlowControl::None, FlowControl::XonXoff, FlowControl::RtsCts];

    /// The name `--flow` takes.
    pub fn name(self) -> &'static str {
        match self {
            FlowControl::None => "none",
            FlowControl::XonXoff => "xon-xoff",
            FlowControl::RtsCts => "rts-cts",
        }
    }
}

impl std::fmt::Display for FlowControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FlowControl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<FlowControl> {
        FlowControl::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown flow control {s:?} (none, xon-xoff or rts-cts)")
            })
    }
}

/// How to open a serial device.
#[derive(Clone, Debug)]
pub struct SerialConfig {
    /// The tty, e.g. `/dev/ttyAMA0` or `/dev/serial/by-id/...`.
    pub path: PathBuf,
    /// Bits per second, one of the standard rates.
    pub baud: u32,
    /// Flow control.
    pub flow: FlowControl,
    /// First delay before reopening a lost device; doubles up to [`MAX_BACKOFF`].
    pub backoff: Duration,
}

/// Longest wait between two attempts to reopen a lost device.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Transport failures callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device could not be opened.
    #[error("opening serial device \"{path}\": {source}")]
    Open {
        /// The device path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The device refused the line settings.
    #[error("configuring serial device \"{path}\" ({what}): {source}")]
    Configure {
        /// The device path.
        path: String,
        /// Which setting.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The baud rate has no termios constant.
    #[error("baud rate {0} is not supported (use a standard rate such as 9600, 57600, 115200, 230400, 460800 or 921600)")]
    Baud(u32),
    /// The device went away; the reader is reopening it.
    #[error("serial device \"{path}\" lost: {source}")]
    Lost {
        /// The device path.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// stdin/stdout failed (a closed pipe, for instance).
    #[error("{what}: {source}")]
    Io {
        /// `reading stdin` or `writing stdout`.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// What one [`Reader::read`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes are in the buffer.
    Data(usize),
    /// stdin closed: the session is over.
    Eof,
    /// The serial device came back after a loss; the peer may have missed output.
    Reconnected,
}

/// Opens the transport: stdio when `serial` is `None`.
pub fn open(serial: Option<&SerialConfig>) -> Result<(Reader, Writer), TransportError> {
    match serial {
        None => Ok((
            Reader(ReaderKind::Stdin(io::stdin())),
            Writer(Arc::new(WriterKind::Stdout(Mutex::new(io::stdout())))),
        )),
        Some(cfg) => {
            let file = open_tty(cfg)?;
            let shared = Arc::new(Serial {
                cfg: cfg.clone(),
                file: Mutex::new(Some(Arc::new(file))),
                write: Mutex::new(()),
                held: AtomicBool::new(false),
            });
            Ok((
                Reader(ReaderKind::Serial(Arc::clone(&shared))),
                Writer(Arc::new(WriterKind::Serial(shared))),
            ))
        }
    }
}

/// The input half; owned by one thread.
pub struct Reader(ReaderKind);

enum ReaderKind {
    Stdin(io::Stdin),
    Serial(Arc<Serial>),
}

/// The output half; cheap to clone, whole writes never interleave.
#[derive(Clone)]
pub struct Writer(Arc<WriterKind>);

enum WriterKind {
    Stdout(Mutex<io::Stdout>),
    Serial(Arc<Serial>),
}

/// The serial device shared by both halves.
struct Serial {
    cfg: SerialConfig,
    /// The open device; `None` while it is lost.
    file: Mutex<Option<Arc<File>>>,
    /// Held for a whole write so lines from two threads never interleave.
    write: Mutex<()>,
    /// Set when the device comes back, cleared by [`Writer::resume`]: until the session has
    /// announced the reconnect, output (the rest of an interrupted reply) is dropped, so the
    /// new peer's first line is the announcement.
    held: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave an fd or a unit in a torn state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Serial {
    fn current(&self) -> Option<Arc<File>> {
        lock(&self.file).clone()
    }

    fn path(&self) -> String {
        self.cfg.path.display().to_string()
    }

    fn lost(&self, source: io::Error) -> TransportError {
        TransportError::Lost {
            path: self.path(),
            source,
        }
    }
}

impl Reader {
    /// Blocks until input arrives, stdin closes, or a lost serial device is back.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Received, TransportError> {
        match &mut self.0 {
            ReaderKind::Stdin(stdin) => loop {
                match stdin.read(buf) {
                    Ok(0) => return Ok(Received::Eof),
                    Ok(n) => return Ok(Received::Data(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(TransportError::Io {
                            what: "reading stdin",
                            source,
                        })
                    }
                }
            },
            ReaderKind::Serial(serial) => loop {
                let Some(file) = serial.current() else {
                    reopen(serial);
                    return Ok(Received::Reconnected);
                };
                match read_tty(&file, buf) {
                    Ok(Some(n)) => return Ok(Received::Data(n)),
                    Ok(None) => continue,
                    Err(e) => {
                        log::warn!("{}", serial.lost(e));
                        *lock(&serial.file) = None;
                    }
                }
            },
        }
    }
}

/// One poll-then-read; `Ok(None)` when nothing arrived in time. A hangup or a 0-byte read
/// on a tty means the device (or the pty's peer) is gone.
fn read_tty(file: &File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let revents = poll(file.as_raw_fd(), libc::POLLIN, 500)?;
    if revents == 0 {
        return Ok(None);
    }
    if revents & libc::POLLIN == 0
        && revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    {
        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "hang-up"));
    }
    let mut f = file;
    match f.read(buf) {
        Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file")),
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reopens the device until it works, doubling the wait up to [`MAX_BACKOFF`].
fn reopen(serial: &Serial) {
    let mut wait = serial.cfg.backoff;
    loop {
        std::thread::sleep(wait);
        match open_tty(&serial.cfg) {
            Ok(file) => {
                log::warn!("serial device \"{}\" is back", serial.path());
                serial.held.store(true, Ordering::Release);
                *lock(&serial.file) = Some(Arc::new(file));
                return;
            }
            Err(e) => {
                log::debug!("{e}; retrying in {wait:?}");
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl Writer {
    /// Writes all of `bytes`, waiting while the link is full; a lost device is
    /// [`TransportError::Lost`] (the reader reconnects it).
    pub fn send(&self, bytes: &[u8]) -> Result<(), TransportError> {
        match &*self.0 {
            WriterKind::Stdout(out) => {
                let mut out = lock(out);
                out.write_all(bytes)
                    .and_then(|()| out.flush())
                    .map_err(|source| TransportError::Io {
                        what: "writing stdout",
                        source,
                    })
            }
            WriterKind::Serial(serial) => {
                let _whole = lock(&serial.write);
                if serial.held.load(Ordering::Acquire) {
                    return Err(serial.lost(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "reconnected, not yet announced",
                    )));
                }
                let file = serial.current().ok_or_else(|| {
                    serial.lost(io::Error::new(io::ErrorKind::NotConnected, "not connected"))
                })?;
                write_tty(serial, &file, bytes).map_err(|e| serial.lost(e))
            }
        }
    }

    /// Lets output through again after a reconnect; call it to announce the reconnect.
    pub fn resume(&self) {
        if let WriterKind::Serial(serial) = &*self.0 {
            serial.held.store(false, Ordering::Release);
        }
    }

    /// Whether this is a serial link (it survives the peer going away).
    pub fn is_serial(&self) -> bool {
        matches!(&*self.0, WriterKind::Serial(_))
    }
}

/// Partial writes are resumed; a full queue is waited out in short polls so a device that
/// was replaced meanwhile is noticed instead of waited on forever.
fn write_tty(serial: &Serial, file: &Arc<File>, mut bytes: &[u8]) -> io::Result<()> {
    let mut f: &File = file;
    while !bytes.is_empty() {
        match f.write(bytes) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let revents = poll(file.as_raw_fd(), libc::POLLOUT, 200)?;
                if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "hang-up"));
                }
                let same = serial.current().is_some_and(|cur| Arc::ptr_eq(&cur, file));
                if !same {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "device replaced",
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `poll(2)` on one descriptor; returns its `revents` (0 on timeout or signal).
fn poll(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, exclusively borrowed pollfd array of length 1.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(if r == 0 { 0 } else { pfd.revents })
}

/// Opens `cfg.path` non-blocking without becoming its controlling terminal, and sets it to
/// raw 8N1 at the baud rate with the chosen flow control; stale input is discarded.
pub fn open_tty(cfg: &SerialConfig) -> Result<File, TransportError> {
    let path = cfg.path.display().to_string();
    let speed = baud_constant(cfg.baud).ok_or(TransportError::Baud(cfg.baud))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&cfg.path)
        .map_err(|source| TransportError::Open {
            path: path.clone(),
            source,
        })?;
    let fd = file.as_raw_fd();
    let configure = |what: &'static str, r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(TransportError::Configure {
                path: path.clone(),
                what,
                source: io::Error::last_os_error(),
            })
        }
    };
    // SAFETY: termios is plain old data; all-zero is a valid value that tcgetattr overwrites.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the lifetime of `file`; `t` is a valid termios to fill.
    configure("tcgetattr", unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: `t` is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::CSTOPB | libc::CRTSCTS);
    t.c_cflag |= libc::CS8 | libc::CLOCAL | libc::CREAD;
    t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
    match cfg.flow {
        FlowControl::None => {}
        FlowControl::XonXoff => t.c_iflag |= libc::IXON | libc::IXOFF,
        FlowControl::RtsCts => t.c_cflag |= libc::CRTSCTS,
    }
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a valid termios; `speed` is a termios speed constant.
    configure("input speed", unsafe { libc::cfsetispeed(&mut t, speed) })?;
    // SAFETY: as above.
    configure("output speed", unsafe { libc::cfsetospeed(&mut t, speed) })?;
    // SAFETY: `fd` is open; `t` is a valid termios.
    configure("tcsetattr", unsafe {
        libc::tcsetattr(fd, libc::TCSANOW, &t)
    })?;
    // SAFETY: `fd` is open; flushing queues has no memory effects.
    configure("tcflush", unsafe { libc::tcflush(fd, libc::TCIFLUSH) })?;
    log::info!(
        "serial device \"{path}\" open: {} baud 8N1, flow control {:?}",
        cfg.baud,
        cfg.flow
    );
    Ok(file)
}

/// The termios constant for a baud rate.
fn baud_constant(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        500000 => libc::B500000,
        921600 => libc::B921600,
        1000000 => libc::B1000000,
        1500000 => libc::B1500000,
        2000000 => libc::B2000000,
        3000000 => libc::B3000000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_baud_is_a_typed_error_naming_it() {
        let cfg = SerialConfig {
            path: "/dev/null".into(),
            baud: 12345,
            flow: FlowControl::None,
            backoff: Duration::from_millis(10),
        };
        let err = open_tty(&cfg).unwrap_err();
        assert!(matches!(err, TransportError::Baud(12345)), "{err}");
    }

    #[test]
    fn missing_device_is_an_open_error_naming_the_path() {
        let cfg = SerialConfig {
            path: "/nonexistent/ttyX".into(),
            baud: 115200,
            flow: FlowControl::None,
            backoff: Duration::from_millis(10),
        };
        let err = open_tty(&cfg).unwrap_err();
        assert!(matches!(err, TransportError::Open { .. }));
        assert!(err
            .to_string()
            .starts_with("opening serial device \"/nonexistent/ttyX\": "));
    }

    #[test]
    fn a_file_that_is_not_a_tty_is_a_configure_error() {
        let cfg = SerialConfig {
            path: "/dev/null".into(),
            baud: 115200,
            flow: FlowControl::None,
            backoff: Duration::from_millis(10),
        };
        let err = open_tty(&cfg).unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Configure {
                    what: "tcgetattr",
                    ..
                }
            ),
            "{err}"
        );
    }
}
