//! Starting MPI jobs from Rust (tests, benchmarks): the `mpirun` command line of
//! OpenMPI for ranks on this machine.

use std::process::Command;

/// `mpirun -np {ranks}` for a job on this machine: more ranks than cores allowed
/// (`--oversubscribe`), no core binding (ranks that share cores must not be pinned to
/// the same one), and OpenMPI's run-as-root variables set (ignored when not root). Add
/// the program and its arguments.
///
/// # Example
/// ```no_run
/// let status = burn_comm::mpirun::command(4).arg("target/release/examples/train_tiny").args(["--pp", "2", "--ep", "2"]).status().unwrap();
/// assert!(status.success());
/// ```
pub fn command(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
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
    Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
