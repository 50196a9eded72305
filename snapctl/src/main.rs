//! `snapctl`: boot a KVM guest, take live snapshots of its memory without stopping it, verify and restore them.
#![forbid(unsafe_code)]

mod api;
mod client;
mod migrate;
mod offline;
mod server;
mod units;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Live snapshots of running KVM guests.
#[derive(Debug, Parser)]
#[command(name = "snapctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

/// Where the control socket is.
#[derive(Debug, Args, Clone)]
struct SockArgs {
    /// Control socket path (default: derived from --name).
    #[arg(long, global = true)]
    api_sock: Option<PathBuf>,
    /// VM name; selects the default socket path `$XDG_RUNTIME_DIR/snapctl/NAME.sock` (or /run/snapctl as root).
    #[arg(long, global = true, default_value = "default")]
    name: String,
}

impl SockArgs {
    /// The socket of the VM to talk to.
    fn path(&self) -> anyhow::Result<PathBuf> {
        api::socket_path(self.api_sock.as_deref(), &self.name, false)
    }

    /// The socket a VMM serves (its default directory is created if missing).
    fn serve_path(&self) -> anyhow::Result<PathBuf> {
        api::socket_path(self.api_sock.as_deref(), &self.name, true)
    }
}

/// Options shared by `boot` and `restore`.
#[derive(Debug, Args, Clone)]
struct VmmArgs {
    /// Guest memory backing: anon (THP), memfd (shared), hugetlbfs (2 MiB pages, must be reserved).
    #[arg(long, value_parser = ["anon", "memfd", "hugetlbfs"])]
    mem_backend: Option<String>,
    /// Write the guest's serial console to this file instead of the terminal.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Track guest writes after each save (and from an eager restore), so that `save --parent`
    /// stores only what changed. `off`: no write-protect faults between saves (the first write to
    /// each page after a save is free) and every save stores all memory.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    track_writes: String,
}

impl VmmArgs {
    /// `--track-writes on` (the default).
    pub(crate) fn tracks_writes(&self) -> bool {
        self.track_writes != "off"
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the built-in guest and serve the control socket until the VM ends.
    Boot {
        /// Guest memory size (e.g. 512M, 2G).
        #[arg(long, default_value = "512M", value_parser = units::parse_size)]
        mem: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=64))]
        vcpus: u8,
        /// Guest write rate per vCPU: `full`, `idle`, or pages per second (e.g. `20000`).
        #[arg(long, default_value = "full")]
        write_rate: String,
        /// Pages each vCPU keeps rewriting (as a size, e.g. 64M; default: its whole slice).
        #[arg(long, value_parser = units::parse_size)]
        working_set: Option<u64>,
        /// Seed of the guest's deterministic write sequence.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Boot this kernel (ELF vmlinux or bzImage) instead of the built-in guest.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line for --kernel.
        #[arg(
            long,
            requires = "kernel",
            default_value = "console=ttyS0 earlyprintk=serial,ttyS0"
        )]
        cmdline: String,
        #[command(flatten)]
        vmm: VmmArgs,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Restore a snapshot into a new VM (or receive a migrating one with --listen) and serve the
    /// control socket until it ends.
    Restore {
        /// Snapshot file.
        #[arg(required_unless_present = "listen")]
        file: Option<PathBuf>,
        /// Instead of a file, wait for one VM migrated live by `snapctl migrate` on HOST:PORT or
        /// unix:PATH; it runs at once, its memory follows. Pages are not encrypted: use a Unix
        /// socket or a trusted network.
        #[arg(long, value_name = "ADDR", conflicts_with_all = ["file", "lazy"], requires = "token_file")]
        listen: Option<String>,
        /// File holding the secret shared with the source (mode 0600), for --listen.
        #[arg(long, value_name = "FILE", requires = "listen")]
        token_file: Option<PathBuf>,
        /// With --listen: after the connection is lost once the VM runs, how long to wait for
        /// the source to reconnect (`snapctl migrate --resume`) before stopping, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60, requires = "listen")]
        resume_timeout: u64,
        /// Load and restore, but do not run the vCPUs until `snapctl resume`.
        #[arg(long)]
        paused: bool,
        /// Start the vCPUs at once and fill guest memory on demand (userfaultfd) and in the
        /// background, instead of loading it all first; `status` shows the fill, a `save` waits
        /// for it to finish.
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        vmm: VmmArgs,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Take a live snapshot of the running VM.
    Save {
        /// Output file, or `-` for standard output.
        #[arg(long, short)]
        out: PathBuf,
        /// Compress records with zstd.
        #[arg(long)]
        zstd: bool,
        /// zstd level (implies --zstd).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: Option<i32>,
        /// Limit the memory scan to this rate (e.g. 200M = 200 MiB/s); faulted pages are never throttled.
        #[arg(long, value_parser = units::parse_size)]
        max_bandwidth: Option<u64>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Low CPU priority for the saver's scan and compression threads: a busy guest keeps more of its
        /// speed, the save takes longer (see docs/BENCH-RESULTS.md for the trade).
        #[arg(long)]
        background: bool,
        /// Cap of the memory guest writes are staged in before they reach the output (e.g. 512M, 2G;
        /// default: half of the host's available memory, at most the guest's RAM). Staging grows only
        /// while the guest writes; past the cap, guest writes wait for the output.
        #[arg(long, value_parser = parse_max_staging)]
        max_staging: Option<u64>,
        /// Staging memory to allocate before the freeze (e.g. 1G, 0, or auto: what the guest wrote
        /// since the VM's last save, or on a first save what it writes while watched for up to
        /// 50 ms). Where fresh memory is slow (cloud VMs), a guest writing all over its RAM then
        /// keeps more of its speed; the save starts that much later.
        #[arg(long, value_name = "SIZE|auto", value_parser = parse_prepare_staging)]
        prepare_staging: Option<vm_snapshot::PrepareStaging>,
        /// Store only the memory written since PARENT, this VM's last snapshot (an incremental
        /// save; the new file refers to PARENT, which must stay where it is). Without a record of
        /// the writes since PARENT's freeze, all memory is saved and the summary says why.
        #[arg(long, value_name = "PARENT")]
        parent: Option<PathBuf>,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Tuning: bytes copied and released per write fault (e.g. 4K, 64K, 2M).
        #[arg(long, hide = true, value_parser = units::parse_size)]
        fault_block: Option<u64>,
        /// Tuning: bytes copied and released per scan unit (e.g. 512K, 2M).
        #[arg(long, hide = true, value_parser = units::parse_size)]
        scan_block: Option<u64>,
        /// Tuning: do not collapse split huge pages back after the save.
        #[arg(long, hide = true)]
        no_huge_restore: bool,
        /// Tuning: store every page of the units written since the parent, without comparing
        /// page contents (no page hashes; later incremental saves store whole written units until
        /// the next full save).
        #[arg(long, hide = true)]
        no_page_hashes: bool,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Move the running VM live to a VMM waiting with `snapctl restore --listen`: the guest is
    /// frozen for milliseconds, runs at the destination at once, its memory follows (each page
    /// sent once); this VMM ends when all memory has arrived.
    Migrate {
        /// The destination: HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR", required_unless_present = "resume")]
        to: Option<String>,
        /// File holding the secret shared with the destination (mode 0600).
        #[arg(long, value_name = "FILE", required_unless_present = "resume")]
        token_file: Option<PathBuf>,
        /// Reconnect a migration whose connection was lost after the destination ran (its
        /// guest waits for the missing memory): the destination says which pages it holds and
        /// the rest is sent. --to and --token-file default to the interrupted migration's.
        #[arg(long)]
        resume: bool,
        /// Compress memory with zstd (for slow links).
        #[arg(long)]
        zstd: bool,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Write an incremental snapshot and its parents as one standalone snapshot file.
    Merge {
        /// The incremental snapshot (the top of its chain).
        file: PathBuf,
        /// The standalone file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace `--out` if it exists.
        #[arg(long)]
        force: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot file offline: structure, every checksum, page coverage, trailer (of
    /// every layer of an incremental snapshot, and the links between them).
    Verify {
        /// Snapshot file.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a built-in-guest snapshot against the guest's write sequence at the freeze instant (the oracle).
    Oracle {
        /// Snapshot file.
        file: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a snapshot's header and totals.
    Info {
        /// Snapshot file.
        file: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the running VM's state: guest progress per vCPU, uptime, memory, save in progress.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Pause every vCPU of the running VM.
    Pause {
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Resume every vCPU of the running VM.
    Resume {
        /// Resume a guest that a failed migration left frozen after the destination had started
        /// it: it runs on from its freeze instant, and whatever the destination's guest did is
        /// lost. Stop the destination first.
        #[arg(long)]
        force_after_failed_migration: bool,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Cancel the save in progress.
    Cancel {
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Ask the built-in guest to check its own memory against its write sequence.
    SelfCheck {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Stop the VM and end its VMM process.
    Shutdown {
        #[command(flatten)]
        sock: SockArgs,
    },
    /// Print a shell completion script to standard output (e.g. `snapctl completions bash >
    /// /etc/bash_completion.d/snapctl`).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output (e.g. `snapctl man | man -l -`), or write it and
    /// one page per command into a directory.
    Man {
        /// Write snapctl.1 and snapctl-COMMAND.1 for every command into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `--max-staging SIZE`: a size of at least 4 MiB (the VMM also refuses more than the host's memory).
fn parse_max_staging(s: &str) -> Result<u64, String> {
    let v = units::parse_size(s)?;
    if v < vm_snapshot::MIN_MAX_STAGING {
        return Err(format!(
            "`{s}` is too small: staging needs at least 4M (guest writes would wait for the output)"
        ));
    }
    Ok(v)
}

/// `--prepare-staging SIZE|auto`.
fn parse_prepare_staging(s: &str) -> Result<vm_snapshot::PrepareStaging, String> {
    if s == "auto" {
        return Ok(vm_snapshot::PrepareStaging::Auto);
    }
    units::parse_size(s)
        .map(vm_snapshot::PrepareStaging::Bytes)
        .map_err(|e| format!("{e} (or `auto`)"))
}

/// Set-up of a process that becomes a long-running VMM (`boot`, `restore`). Logging: levels and
/// timestamps on standard error, filtered by `RUST_LOG` (default `info`), as Firecracker and Cloud
/// Hypervisor do; one-shot commands print plain messages instead. One heap for all threads, so that
/// what a save frees goes back to the host after it.
fn init_vmm() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if !uffd_sys::host::single_heap_arena() {
        log::debug!("the allocator kept its per-thread heaps: RSS may stay higher after saves");
    }
}

/// The man pages: snapctl(1), then one per command (snapctl-boot(1), …), which snapctl(1) refers to.
fn man_pages() -> Vec<clap_mangen::Man> {
    let page = |cmd: clap::Command| {
        let title = cmd
            .get_display_name()
            .unwrap_or_else(|| cmd.get_name())
            .to_uppercase();
        clap_mangen::Man::new(cmd)
            .title(title)
            .source(concat!("snapctl ", env!("CARGO_PKG_VERSION")))
    };
    let mut cli = Cli::command().disable_help_subcommand(true);
    // Names the commands' pages `snapctl-COMMAND`.
    cli.build();
    let commands: Vec<clap::Command> = cli
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .cloned()
        .collect();
    std::iter::once(cli).chain(commands).map(page).collect()
}

/// `snapctl man [--dir DIR]`.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let pages = man_pages();
    let Some(dir) = dir else {
        return print_generated(|buf| pages[0].render(buf));
    };
    for page in &pages {
        page.generate_to(dir)
            .with_context(|| format!("writing {} into {}", page.get_filename(), dir.display()))?;
    }
    eprintln!(
        "snapctl: wrote {} man pages into {}",
        pages.len(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes generated text to standard output; a closed pipe is an error, not a panic.
fn print_generated(
    render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
) -> anyhow::Result<ExitCode> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapctl: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Command::Boot {
            mem,
            vcpus,
            write_rate,
            working_set,
            seed,
            kernel,
            initrd,
            cmdline,
            vmm,
            sock,
        } => {
            init_vmm();
            let kernel = kernel.map(|kernel| vmm_core::KernelConfig {
                kernel,
                initrd,
                cmdline,
            });
            let cfg =
                server::boot_config(mem, vcpus, &write_rate, working_set, seed, kernel, &vmm)?;
            server::run_boot(cfg, &vmm, &sock.serve_path()?)
        }
        Command::Restore {
            file,
            listen,
            token_file,
            resume_timeout,
            paused,
            lazy,
            vmm,
            sock,
        } => {
            init_vmm();
            match (file, listen, token_file) {
                (_, Some(listen), Some(token)) => server::run_restore_listen(
                    &listen,
                    &token,
                    std::time::Duration::from_secs(resume_timeout),
                    paused,
                    &vmm,
                    &sock.serve_path()?,
                ),
                (Some(file), _, _) => {
                    server::run_restore(&file, paused, lazy, &vmm, &sock.serve_path()?)
                }
                _ => anyhow::bail!("name a snapshot file, or --listen ADDR --token-file FILE"),
            }
        }
        Command::Migrate {
            to,
            token_file,
            resume,
            zstd,
            json,
            sock,
        } => migrate::migrate(
            &sock.path()?,
            to.as_deref(),
            token_file.as_deref(),
            resume,
            zstd,
            json,
        ),
        Command::Save {
            out,
            zstd,
            zstd_level,
            max_bandwidth,
            force,
            background,
            json,
            max_staging,
            prepare_staging,
            parent,
            fault_block,
            scan_block,
            no_huge_restore,
            no_page_hashes,
            sock,
        } => client::save(
            &sock.path()?,
            &out,
            zstd || zstd_level.is_some(),
            zstd_level,
            max_bandwidth,
            force,
            json,
            client::SaveTuning {
                max_staging,
                prepare_staging,
                fault_block: fault_block.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                scan_block: scan_block.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                no_huge_restore,
                no_page_hashes,
                background,
                parent,
            },
        ),
        Command::Verify { file, json } => offline::verify(&file, json),
        Command::Merge {
            file,
            out,
            force,
            json,
        } => offline::merge(&file, &out, force, json),
        Command::Info { file, json } => offline::info(&file, json),
        Command::Oracle { file, json } => offline::oracle(&file, json),
        Command::Status { json, sock } => client::status(&sock.path()?, json),
        Command::Pause { sock } => client::simple(&sock.path()?, api::Request::Pause, "paused"),
        Command::Resume {
            force_after_failed_migration,
            sock,
        } => client::simple(
            &sock.path()?,
            api::Request::Resume {
                force_after_failed_migration,
            },
            "resumed",
        ),
        Command::Cancel { sock } => {
            client::simple(&sock.path()?, api::Request::Cancel, "cancelled")
        }
        Command::SelfCheck { json, sock } => client::self_check(&sock.path()?, json),
        Command::Shutdown { sock } => {
            client::simple(&sock.path()?, api::Request::Shutdown, "shutting down")
        }
        Command::Completions { shell } => print_generated(|buf| {
            clap_complete::generate(shell, &mut Cli::command(), "snapctl", buf);
            Ok(())
        }),
        Command::Man { dir } => man(dir.as_deref()),
    }
}
