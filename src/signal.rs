//! SIGTERM and SIGINT as a request to stop, not a kill: `run` and `serve` end the current
//! generation at a token boundary, write their last line (and the session file, if asked),
//! and exit normally. Without this a service manager stopping the board would cut a reply
//! mid-line and lose an unsaved conversation.
//!
//! The handler only stores the signal number and writes one byte to a pipe (both
//! async-signal-safe); the pipe lets a thread blocked on input wake up.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked us to stop; 0 = none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Write end of the wake-up pipe; -1 = none.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; `fd` is a non-blocking pipe kept open for
        // the life of the process, and `byte` outlives the call. A full pipe just fails.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Installs the handler for SIGTERM and SIGINT. Blocking reads are restarted (`SA_RESTART`),
/// so nothing else sees `EINTR`.
pub fn install() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; we fill the handler, an empty mask and flags
        // before passing it, and `on_signal` only does async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The signal number that asked us to stop, if one arrived.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// A pipe that becomes readable (one byte per signal) when a stop signal arrives. Call once;
/// a second call replaces the first pipe's write end.
pub fn wake_pipe() -> io::Result<File> {
    let mut fds = [0 as libc::c_int; 2]; // (read end, write end)
                                         // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fds[1] is the write end we just created; a full pipe must not block the handler.
    unsafe {
        let flags = libc::fcntl(fds[1], libc::F_GETFL);
        libc::fcntl(fds[1], libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    WAKE_FD.store(fds[1], Ordering::SeqCst);
    if received().is_some() {
        // A signal that came before the pipe existed still wakes the reader.
        on_signal(RECEIVED.load(Ordering::SeqCst));
    }
    // SAFETY: fds[0] is a freshly created descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fds[0]) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_signal_sets_the_flag_and_wakes_the_pipe() {
        install().unwrap();
        let mut pipe = wake_pipe().unwrap();
        // SAFETY: raise(3) delivers SIGTERM to this thread, where our handler runs.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert_eq!(received(), Some(libc::SIGTERM));
        let mut byte = [0u8; 1];
        pipe.read_exact(&mut byte).unwrap();
        assert_eq!(byte, [1]);
    }
}
