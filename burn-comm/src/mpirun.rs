//! Starting MPI jobs from Rust (tests, benchmarks): the `mpirun` command line of
//! OpenMPI for ranks on this machine.

use std::process::Command;

/// `mpirun -np {ranks}` for a job on this machine: more ranks than cores allowed
/// (`--oversubscribe`), no core binding (ranks that share cores must not be pinned to
/// the same one), OpenMPI's run-as-root variables set (ignored when not root), and a
/// session directory of its own under the temporary directory. Add the program and its
/// arguments.
///
/// # Example
/// ```no_run
/// let status = burn_comm::mpirun::command(4).arg("target/release/examples/train_tiny").args(["--pp", "2", "--ep", "2"]).status().unwrap();
/// assert!(status.success());
/// ```
pub fn command(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    // A session directory of the job's own: two mpirun started at the same moment race
    // to create a shared one ("orte_session_dir failed: File exists", seen here).
    static JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let job = JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let session = std::env::temp_dir().join(format!("burn-comm-mpirun-{}-{job}", std::process::id()));
    if std::fs::create_dir_all(&session).is_ok() {
        cmd.env("OMPI_MCA_orte_tmpdir_base", &session);
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // No network beyond loopback is needed or reachable: shared memory between ranks.
        .env("OMPI_MCA_btl", "self,vader")
        .args(["--oversubscribe", "--bind-to", "none", "-np"])
        .arg(ranks.to_string());
    cmd
}

/// Whether `mpirun` is on the `PATH`.
pub fn available() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// What a finished job left.
#[derive(Clone, Debug)]
pub struct Job {
    /// Whether `mpirun` exited with 0.
    pub success: bool,
    /// The ranks' standard output, then their standard error.
    pub output: String,
    /// From start to exit.
    pub elapsed: std::time::Duration,
}

/// Runs `program args` as `ranks` processes on this machine ([`command`]) with the extra
/// environment `envs`, and waits for the job; a job still running after `limit` is
/// killed and returned as `Err` (a hang).
///
/// # Errors
/// The job hung (`Err` with what it printed), or `mpirun` could not be started.
pub fn run(ranks: usize, program: &std::path::Path, args: &[&str], envs: &[(&str, &str)], limit: std::time::Duration) -> Result<Job, Job> {
    use std::process::Stdio;
    let start = std::time::Instant::now();
    let mut cmd = command(ranks);
    let session = cmd.get_envs().find(|(k, _)| *k == "OMPI_MCA_orte_tmpdir_base").and_then(|(_, v)| v.map(std::path::PathBuf::from));
    let spawned = cmd.arg(program).args(args).envs(envs.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Err(Job { success: false, output: format!("mpirun could not start: {e}"), elapsed: start.elapsed() }),
    };
    // Drain the pipes while waiting, so that a chatty job does not block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let mut hung = false;
    let status = loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            break Some(status);
        }
        if start.elapsed() > limit {
            hung = true;
            child.kill().ok();
            break child.wait().ok();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let output = format!("{}{}", out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if let Some(dir) = session {
        std::fs::remove_dir_all(dir).ok();
    }
    let job = Job { success: !hung && status.is_some_and(|s| s.success()), output, elapsed };
    if hung {
        Err(job)
    } else {
        Ok(job)
    }
}
