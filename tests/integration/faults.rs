//! `edgelm run` under faults: a signal mid-generation, a closed stdout, a full disk while
//! saving a session. Each ends cleanly, says what happened, and loses no saved state.
//! (Serve's faults are in tests/serve.rs.)

use crate::common;

use common::fixture;
use std::fs;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn scratch(name: &str) -> PathBuf {
    common::scratch("faults", name)
}

/// `edgelm run` on the tiny Llama, greedy, through EOS, `n` tokens (under qemu-user when
/// cross/test.sh names a runner: the signal and the file-size limit reach the emulated
/// process through the emulator).
fn run_cmd(n: usize) -> Command {
    let mut cmd = common::edgelm_command();
    cmd.args(["run", "-m"])
        .arg(fixture("tiny-llama/onnx-f32"))
        .args(["-t", "1", "--ignore-eos", "-n", &n.to_string()]);
    cmd
}

#[test]
fn sigterm_mid_run_stops_at_a_token_and_saves_the_session() {
    let dir = scratch("sigterm");
    let session = dir.join("conv.session");
    let mut child = run_cmd(240)
        .arg("--save-session")
        .arg(&session)
        .arg("Once upon a time")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap(); // generation has started
                                            // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        status.signal(),
        None,
        "killed instead of stopping: {stderr}"
    );
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("edgelm: "), "{stderr}");
    assert_eq!(rest.last(), Some(&b'\n'), "the text ends with a line end");

    // The saved conversation continues.
    let out = run_cmd(2)
        .arg("--load-session")
        .arg(&session)
        .arg(" and")
        .output()
        .unwrap();
    common::assert_success(&out);
}

#[test]
fn closed_stdout_ends_run_quietly() {
    let mut child = run_cmd(200)
        .arg("Once upon a time")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `edgelm run … | head -c0`
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(!stderr.contains("edgelm: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn full_disk_while_saving_keeps_the_old_session() {
    let dir = scratch("full-disk");
    let session = dir.join("conv.session");
    let out = run_cmd(4)
        .arg("--save-session")
        .arg(&session)
        .arg("Once upon a time")
        .output()
        .unwrap();
    common::assert_success(&out);
    let old = fs::read(&session).unwrap();
    assert!(old.len() > 4096, "session of {} bytes", old.len());

    // The continuation's file is larger than the old one; the "disk" holds 4 KiB per file.
    let mut cmd = run_cmd(4);
    cmd.arg("--load-session")
        .arg(&session)
        .arg("--save-session")
        .arg(&session)
        .arg(" and");
    disk_holds_4_kib_per_file(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("edgelm: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("writing session") && errors[0].contains("conv.session.tmp"),
        "{}",
        errors[0]
    );
    assert_eq!(fs::read(&session).unwrap(), old, "the old session changed");
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["conv.session"], "temporary files left behind");
}

/// Makes `cmd`'s child see a full disk past 4 KiB per file: a larger write fails with EFBIG.
fn disk_holds_4_kib_per_file(cmd: &mut Command) {
    // SAFETY: signal(2) and setrlimit(2) are async-signal-safe. SIGXFSZ is ignored so an
    // oversized write fails with EFBIG, as on a full disk, instead of killing the process.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_session_named_like_its_temporary_file_is_still_replaced_atomically() {
    // `x.tmp` used to be its own temporary file (with_extension("tmp")), so a failed save
    // truncated it in place.
    let dir = scratch("tmp-name");
    let session = dir.join("conv.tmp");
    let out = run_cmd(4)
        .arg("--save-session")
        .arg(&session)
        .arg("Once upon a time")
        .output()
        .unwrap();
    assert!(out.status.success());
    let old = fs::read(&session).unwrap();
    let mut cmd = run_cmd(4);
    cmd.arg("--load-session")
        .arg(&session)
        .arg("--save-session")
        .arg(&session)
        .arg(" and");
    disk_holds_4_kib_per_file(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read(&session).unwrap(), old, "the old session changed");
}
