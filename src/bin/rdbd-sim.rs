//! `rdbd-sim`: runs seeded simulations of a two-node cluster and reports invariant violations.
//!
//! - `rdbd-sim run --seeds N [--start S] [--steps K] [--inject-bug NAME]`
//! - `rdbd-sim replay --seed S [--trace] [--inject-bug NAME]`
//! - `rdbd-sim bugs`: the bugs `--inject-bug` can plant.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Parser, Subcommand};
use rdbd::replication::core::bugs::Bug;
use rdbd::sim::{run, Options};

#[derive(Parser)]
#[command(name = "rdbd-sim", about = "Deterministic simulation of an rdbd cluster under faults")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Runs seeds START..START+N on every core; exits 1 if any violates an invariant.
    Run {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Events per run before the world heals and must converge.
        #[arg(long, default_value_t = Options::default().steps)]
        steps: u64,
        /// Plants a known bug (see `rdbd-sim bugs`); the run then must find violations.
        #[arg(long, value_parser = parse_bug)]
        inject_bug: Option<Bug>,
        /// Stops at the first violating seed.
        #[arg(long)]
        first: bool,
    },
    /// Runs one seed again, exactly, and prints its first violation (and its events).
    Replay {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = Options::default().steps)]
        steps: u64,
        #[arg(long)]
        trace: bool,
        #[arg(long, value_parser = parse_bug)]
        inject_bug: Option<Bug>,
    },
    /// Lists the bugs `--inject-bug` can plant.
    Bugs,
}

fn parse_bug(name: &str) -> Result<Bug, String> {
    Bug::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
        format!("no such bug '{name}'; known: {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    // A pipe closed early (`| head`) ends the run quietly, as for any command-line filter,
    // instead of a panic on the next print.
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match Cli::parse().command {
        Verb::Bugs => {
            for bug in Bug::ALL {
                println!("{:<30} {}", bug.name(), bug.describe());
            }
            ExitCode::SUCCESS
        }
        Verb::Replay { seed, steps, trace, inject_bug } => {
            let result = run(seed, &Options { steps, bug: inject_bug, trace });
            for line in &result.trace {
                println!("{line}");
            }
            match result.violation {
                Some(v) => {
                    println!(
                        "seed {seed}: violation at step {} ({:.3} ms): {}",
                        v.step,
                        v.time_us as f64 / 1000.0,
                        v.what
                    );
                    ExitCode::FAILURE
                }
                None => {
                    println!("seed {seed}: no violation in {} steps", result.steps);
                    ExitCode::SUCCESS
                }
            }
        }
        Verb::Run { seeds, start, steps, inject_bug, first } => {
            run_many(seeds, start, steps, inject_bug, first)
        }
    }
}

fn run_many(seeds: u64, start: u64, steps: u64, bug: Option<Bug>, first: bool) -> ExitCode {
    let options = Options { steps, bug, trace: false };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicU64::new(start);
    let violations = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let began = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start + seeds || stop.load(Ordering::Relaxed) {
                    break;
                }
                let result = run(seed, &options);
                if let Some(v) = result.violation {
                    if violations.fetch_add(1, Ordering::Relaxed) < 10 {
                        println!("seed {seed}: violation at step {}: {}", v.step, v.what);
                    }
                    if first {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 10_000 == 0 {
                    let rate = n as f64 / began.elapsed().as_secs_f64();
                    println!(
                        "{n} seeds, {} violations, {rate:.0} seeds/s",
                        violations.load(Ordering::Relaxed)
                    );
                }
            });
        }
    });
    let (n, v) = (done.load(Ordering::Relaxed), violations.load(Ordering::Relaxed));
    let secs = began.elapsed().as_secs_f64();
    println!(
        "seeds: {n}, violations: {v} ({secs:.1} s, {:.0} seeds/s on {threads} threads)",
        n as f64 / secs
    );
    if v > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
