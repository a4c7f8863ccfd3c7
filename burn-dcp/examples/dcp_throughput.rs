//! Save and load throughput of burn-dcp against a plain sequential write and read of the
//! same bytes, and the step stall of an asynchronous save against a blocking one.
//!
//! ```sh
//! cargo run --release -p burn-dcp --example dcp_throughput -- [--mb 256] [--dir DIR]
//! ```
//! `--mb` (default 256) of f32 state: one replicated tensor of 1/8 of it and seven
//! tensors sharded over the ranks, saved by 1, 2 and 4 in-process ranks (threads) and
//! loaded back by another number of ranks (resharding). The baseline writes the same
//! bytes to one file and flushes it (`File::write_all` + `sync_all`), and reads them back
//! (`std::fs::read`). Saves flush their files to disk; reads come from the page cache
//! for both (the files were just written).

use burn::tensor::TensorData;
use burn_comm::{launch, Comm, CommError, Transport};
use burn_dcp::{Checkpointer, Chunk, Reader, Snapshot};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TENSORS: usize = 8;

fn bounds(n: usize, w: usize) -> Vec<usize> {
    (0..=w).map(|r| r * (n / w) + r.min(n % w)).collect()
}

/// Rank `r` of `w`: tensor 0 whole (replicated), tensors 1.. its even run of each.
fn snapshot(per_tensor: usize, r: usize, w: usize) -> Snapshot {
    let mut s = Snapshot::new();
    for t in 0..TENSORS {
        let (lo, hi) = match t {
            0 => (0, per_tensor),
            _ => {
                let b = bounds(per_tensor, w);
                (b[r], b[r + 1])
            }
        };
        let data: Vec<f32> = (lo..hi).map(|i| (i % 1000) as f32 * 0.5 + t as f32).collect();
        s.push(Chunk::new(format!("t{t}"), vec![per_tensor], lo, TensorData::new(data, [hi - lo])));
    }
    s
}

fn mb_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn baseline(dir: &Path, bytes: usize) -> (f64, f64) {
    let path = dir.join("baseline.bin");
    let data = vec![7u8; bytes];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let write = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = std::fs::read(&path).unwrap();
    let read = t.elapsed().as_secs_f64();
    assert_eq!(back.len(), bytes);
    std::fs::remove_file(&path).unwrap();
    (write, read)
}

/// The flags, every value checked before anything runs.
#[derive(clap::Parser)]
#[command(about = "Save and load throughput of burn-dcp against a plain write and read of the same bytes")]
struct Args {
    /// Megabytes of f32 state (at least 1).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    mb: u64,
    /// Directory for the checkpoints (emptied first); default: a folder in the temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() {
    let args: Args = clap::Parser::parse();
    let mb = args.mb as usize;
    let dir = args.dir.unwrap_or_else(|| std::env::temp_dir().join("burn-dcp-bench"));
    let per_tensor = mb * 1_000_000 / 4 / TENSORS;
    let bytes = per_tensor * 4 * TENSORS;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "{mb} MB of f32 state in {TENSORS} tensors (one replicated); {} CPUs; the plain write and read of the same bytes just before each row's save",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| ranks saving | save MB/s | plain write MB/s | ratio | ranks loading | load MB/s | plain read MB/s | ratio | async stall ms | blocking save ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (w, w_load) in [(1, 2), (2, 4), (4, 2)] {
        let (bw, br) = baseline(&dir, bytes);
        let root = dir.join(format!("w{w}"));
        // Blocking save of step 1; async save of step 2 (the stall is the call's time).
        let results = launch(Comm::group(w, Transport::Host), |comm| {
            let r = comm.rank();
            let fail = |e: burn_dcp::DcpError| CommError::Engine { rank: r, op: "bench", detail: e.to_string() };
            let mut saver = Checkpointer::new(&root, &comm).map_err(fail)?.with_keep(2);
            comm.barrier("start")?;
            let t = Instant::now();
            saver.save(1, snapshot(per_tensor, r, w)).map_err(fail)?;
            let blocking = t.elapsed().as_secs_f64();
            let s = snapshot(per_tensor, r, w);
            comm.barrier("async")?;
            let t = Instant::now();
            saver.save_async(2, s).map_err(fail)?;
            let stall = t.elapsed().as_secs_f64();
            saver.wait().map_err(fail)?;
            Ok::<_, CommError>((blocking, stall))
        })
        .unwrap();
        let blocking = results.iter().map(|r| r.0).fold(0.0, f64::max);
        let stall = results.iter().map(|r| r.1).fold(0.0, f64::max);
        // Load step 2 into w_load ranks: each reads its runs of every sharded tensor and
        // the replicated one.
        let reader = Reader::latest(&root).unwrap().expect("complete");
        let t = Instant::now();
        let got: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..w_load)
                .map(|r| {
                    let reader = &reader;
                    s.spawn(move || {
                        let mut n = 0;
                        for t in 1..TENSORS {
                            let b = bounds(per_tensor, w_load);
                            n += reader.read(&format!("t{t}"), b[r], b[r + 1] - b[r]).unwrap().as_bytes().len();
                        }
                        n + reader.read("t0", 0, per_tensor).unwrap().as_bytes().len()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let load = t.elapsed().as_secs_f64();
        // Distinct bytes loaded (the replicated tensor counted once, as in the baseline).
        let distinct = bytes;
        assert!(got >= distinct);
        println!(
            "| {w} | {:.0} | {:.0} | {:.2}x | {w_load} | {:.0} | {:.0} | {:.2}x | {:.1} | {:.1} |",
            mb_s(bytes, blocking),
            mb_s(bytes, bw),
            bw / blocking,
            mb_s(distinct, load),
            mb_s(bytes, br),
            br / load,
            1e3 * stall,
            1e3 * blocking
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
