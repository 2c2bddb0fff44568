//! The `ember` binary: Firecracker's command line, plus `ember run` for people.

// The C runtime calls `main` below directly; see there why.
#![no_main]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use argh::FromArgs;

use ember::api::ApiServer;
use ember::builder::{BootImages, StartError, BUILTIN_GUEST};
use ember::config::{
    BootFiles, BootSourceConfig, LogLevel, LoggerConfig, MachineConfig, OpenedFiles, VmConfig,
};
use ember::controller::{ApiLink, Controller};
use ember::seccomp::{Filters, ThreadKind};
use ember::time::Timestamp;
use ember::vmm::{self, StopWatcher};
use ember::vstate::vcpu::{exit_code, ExitSignal};
use ember::{logger, metrics, signal, VERSION};
use event_manager::SubscriberOps;

/// ember: a microVM monitor that speaks Firecracker's API.
#[derive(FromArgs)]
struct Args {
    /// path of the API socket (default /run/firecracker.socket)
    #[argh(option, default = "String::from(\"/run/firecracker.socket\")")]
    api_sock: String,
    /// instance id (1-64 bytes of letters, digits and -)
    #[argh(option, default = "String::from(\"anonymous-instance\")")]
    id: String,
    /// configure the microVM from this JSON file and boot it at once
    #[argh(option)]
    config_file: Option<String>,
    /// serve no API (needs --config-file)
    #[argh(switch)]
    no_api: bool,
    /// JSON file that seeds the metadata store
    #[argh(option)]
    metadata: Option<String>,
    /// add the boot-timer device
    #[argh(switch)]
    boot_timer: bool,
    /// log level: Error, Warning, Info, Debug, Trace or Off
    #[argh(option)]
    level: Option<String>,
    /// log to this file (or named pipe) instead of stdout
    #[argh(option)]
    log_path: Option<String>,
    /// include the level in each log line
    #[argh(switch)]
    show_level: bool,
    /// include the file and line in each log line
    #[argh(switch)]
    show_log_origin: bool,
    /// log only messages from this module
    #[argh(option)]
    module: Option<String>,
    /// write metrics to this file (or named pipe)
    #[argh(option)]
    metrics_path: Option<String>,
    /// custom seccomp filter file
    #[argh(option)]
    seccomp_filter: Option<String>,
    /// run without seccomp filters
    #[argh(switch)]
    no_seccomp: bool,
    /// process start time in microseconds (CLOCK_MONOTONIC), set by the jailer
    #[argh(option)]
    start_time_us: Option<u64>,
    /// process start CPU time in microseconds, set by the jailer
    #[argh(option)]
    start_time_cpu_us: Option<u64>,
    /// CPU time the parent (jailer) used, in microseconds
    #[argh(option)]
    parent_cpu_time_us: Option<u64>,
    /// largest API request body in bytes (default 51200)
    #[argh(option, default = "51200")]
    http_api_max_payload_size: usize,
    /// largest metadata store in bytes (default: the payload limit)
    #[argh(option)]
    mmds_size_limit: Option<usize>,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(RunArgs),
}

/// Boot a microVM in the foreground with its serial console on this terminal. Without
/// --kernel, boots the guest built into ember.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// kernel image: ELF vmlinux (Linux or PVH entry) or bzImage
    #[argh(option)]
    kernel: Option<String>,
    /// initrd image
    #[argh(option)]
    initrd: Option<String>,
    /// kernel command line
    #[argh(option)]
    cmdline: Option<String>,
    /// number of vCPUs (default 1)
    #[argh(option, default = "1")]
    vcpus: u8,
    /// guest memory in MiB (default 128)
    #[argh(option, default = "128")]
    mem: usize,
}

/// Firecracker's rule: 1 to 64 bytes of letters or digits (any script's, as Rust's
/// `char::is_alphanumeric` says) and `-`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_alphanumeric() || c == '-')
}

/// The API socket once it is bound: every exit removes it, a failed one included.
static API_SOCKET: std::sync::OnceLock<ember::uds::SocketFile> = std::sync::OnceLock::new();

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    signal::restore_terminal();
    eprintln!("ember: {msg}");
    log::error!("{msg}");
    metrics::flush();
    if let Some(file) = API_SOCKET.get() {
        file.remove();
    }
    std::process::exit(code);
}

fn start_error_code(e: &StartError) -> i32 {
    match e {
        StartError::KvmOpen(_) | StartError::Vm(_) | StartError::Vcpu(..) => {
            exit_code::GENERIC_ERROR
        }
        _ => exit_code::BAD_CONFIGURATION,
    }
}

/// The process entry, called by the C runtime. ember skips Rust's own start-up around
/// `fn main`: for a process that lives a few milliseconds its work (finding the main thread's
/// stack guard through /proc/self/maps, an alternate signal stack, ~17 syscalls) cost ~65 µs of
/// CPU per VM. Of what it does ember needs two things, done here: file descriptors 0-2 open,
/// so that no file ember opens (a disk image, say) can take the place of its stdout; and
/// SIGPIPE ignored, so that a console or log reader that went away is an EPIPE error.
/// (`std::env::args` still works: glibc hands the arguments to Rust's init-array hook.)
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    open_std_fds();
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    run()
}

/// Points any of fds 0-2 that is closed at /dev/null, as Rust's start-up does.
fn open_std_fds() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: poll reads and writes the three entries of `fds` and nothing else.
    if unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } < 0 {
        return;
    }
    for p in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
        // SAFETY: opening a constant path; a closed fd below it would have been filled
        // first, so the new descriptor is `p.fd`.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if fd != p.fd {
            // Nowhere to report it: stdout and stderr may be the very fds missing.
            std::process::abort();
        }
    }
}

/// Everything after the start-up: parse the command line, build and run the VM, exit.
fn run() -> ! {
    let start = Timestamp::now();
    // One malloc arena for every thread: a vCPU or API thread's first allocation would
    // otherwise map (and trim) a 64 MiB arena of its own, costing syscalls and page faults at
    // every VM start for memory the VMM never needs.
    // SAFETY: mallopt only sets an allocator parameter; no thread has been started yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let argv: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let args = match Args::from_args(&["ember"], &strs) {
        Ok(a) => a,
        Err(early) => {
            if early.status.is_ok() {
                println!("{}", early.output);
                std::process::exit(exit_code::OK);
            }
            eprintln!("ember: {}", early.output.trim_end());
            std::process::exit(exit_code::ARG_PARSING);
        }
    };
    if args.version {
        // Firecracker's first line, which clients parse for the version they talk to (Kata
        // takes the second word, minus the "v", and refuses versions it deems too old), then
        // ember's own version.
        println!(
            "Firecracker v{}\n\nember v{VERSION}",
            ember::controller::FIRECRACKER_API_VERSION
        );
        std::process::exit(exit_code::OK);
    }
    if !valid_id(&args.id) {
        eprintln!(
            "ember: invalid --id {:?}: 1 to 64 bytes of letters, digits and -",
            args.id
        );
        std::process::exit(exit_code::ARG_PARSING);
    }
    if args.no_seccomp && args.seccomp_filter.is_some() {
        eprintln!("ember: --no-seccomp and --seccomp-filter exclude each other");
        std::process::exit(exit_code::ARG_PARSING);
    }

    if args.metadata.is_some() {
        eprintln!("ember: --metadata: the metadata service (MMDS) is not supported by ember yet");
        std::process::exit(exit_code::GENERIC_ERROR);
    }
    // Accepted for compatibility; there is no metadata store to limit yet.
    let _mmds_size_limit = args.mmds_size_limit;
    let is_run = matches!(args.command, Some(Command::Run(_)));
    // `ember run` is for people watching the console: only warnings and errors by default.
    let default_level = if is_run {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Info
    };
    logger::init(&args.id, default_level);
    if args.level.is_some()
        || args.log_path.is_some()
        || args.show_level
        || args.show_log_origin
        || args.module.is_some()
    {
        let level = match args.level.as_deref().map(LogLevel::parse) {
            None => None,
            Some(Some(l)) => Some(l),
            Some(None) => {
                eprintln!(
                    "ember: invalid --level; expected Error, Warning, Info, Debug, Trace or Off"
                );
                // A bad level is a bad configuration to Firecracker, not a bad argument.
                std::process::exit(exit_code::BAD_CONFIGURATION);
            }
        };
        let cfg = LoggerConfig {
            log_path: args.log_path.clone(),
            level: level.or(Some(if is_run {
                LogLevel::Warning
            } else {
                LogLevel::Info
            })),
            show_level: Some(args.show_level),
            show_log_origin: Some(args.show_log_origin),
            module: args.module.clone(),
        };
        // As Firecracker: a log or metrics file the flags name that cannot be set up is a
        // generic error (1), unlike a bad level (152).
        if let Err(e) = logger::configure(&cfg) {
            fail(exit_code::GENERIC_ERROR, e);
        }
    }
    if let Some(p) = &args.metrics_path {
        if let Err(e) = metrics::init(p) {
            fail(exit_code::GENERIC_ERROR, e);
        }
    }
    log::info!("Running ember v{VERSION}");

    let exit = match ExitSignal::new() {
        Ok(e) => Arc::new(e),
        Err(e) => fail(
            exit_code::GENERIC_ERROR,
            format!("cannot create an eventfd: {e}"),
        ),
    };
    // `exit` lives until the process ends, so its eventfd stays valid for the handlers.
    if let Err(e) = signal::install(exit.evt.as_raw_fd()) {
        fail(
            exit_code::GENERIC_ERROR,
            format!("cannot install signal handlers: {e}"),
        );
    }
    if let Err(e) = ember::vstate::vcpu::register_kick_handler() {
        fail(
            exit_code::GENERIC_ERROR,
            format!("cannot install the vCPU kick handler: {e}"),
        );
    }

    let (cfg, boot) = match args.command {
        Some(Command::Run(run)) => {
            let cfg = VmConfig {
                boot_source: run.kernel.as_ref().map(|k| BootSourceConfig {
                    kernel_image_path: k.clone(),
                    initrd_path: run.initrd.clone(),
                    boot_args: run.cmdline.clone(),
                }),
                machine_config: MachineConfig {
                    vcpu_count: run.vcpus,
                    mem_size_mib: run.mem,
                    ..Default::default()
                },
                boot_timer: true,
                ..Default::default()
            };
            if let Err(e) = cfg.machine_config.validate() {
                fail(exit_code::BAD_CONFIGURATION, e);
            }
            if run.kernel.is_none() && (run.initrd.is_some() || run.cmdline.is_some()) {
                fail(
                    exit_code::ARG_PARSING,
                    "--initrd and --cmdline need --kernel (the built-in guest takes neither)",
                );
            }
            let boot = match &cfg.boot_source {
                Some(bs) => match bs.open() {
                    Ok(files) => Boot::Files(files, OpenedFiles::default()),
                    Err(e) => fail(exit_code::BAD_CONFIGURATION, e),
                },
                None => Boot::Builtin,
            };
            signal::set_raw_terminal(true);
            (cfg, Some(boot))
        }
        None => match &args.config_file {
            Some(path) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) => fail(
                        exit_code::BAD_CONFIGURATION,
                        format!("cannot read the config file {path:?}: {e}"),
                    ),
                };
                let (mut cfg, mut files) = match VmConfig::from_json(&text) {
                    Ok(c) => c,
                    Err(e) => fail(
                        exit_code::BAD_CONFIGURATION,
                        format!("invalid config file {path:?}: {e}"),
                    ),
                };
                cfg.boot_timer = args.boot_timer;
                if let Some(l) = &cfg.logger {
                    if let Err(e) = logger::configure(l) {
                        fail(exit_code::BAD_CONFIGURATION, e);
                    }
                }
                if let Some(m) = &cfg.metrics {
                    if let Err(e) = metrics::init(&m.metrics_path) {
                        fail(exit_code::BAD_CONFIGURATION, e);
                    }
                }
                let Some(boot) = files.boot.take() else {
                    fail(exit_code::BAD_CONFIGURATION, "boot-source is required")
                };
                signal::set_raw_terminal(false);
                (cfg, Some(Boot::Files(boot, files)))
            }
            None => {
                if args.no_api {
                    fail(exit_code::ARG_PARSING, "--no-api needs --config-file");
                }
                let cfg = VmConfig {
                    boot_timer: args.boot_timer,
                    ..Default::default()
                };
                (cfg, None)
            }
        },
    };

    let filters = if args.no_seccomp {
        Filters::none()
    } else if let Some(p) = &args.seccomp_filter {
        Filters::from_json_file(p).unwrap_or_else(|e| fail(exit_code::BAD_CONFIGURATION, e))
    } else {
        Filters::builtin().unwrap_or_else(|e| fail(exit_code::GENERIC_ERROR, e))
    };
    if let Err(e) = ember::seccomp::install_sigsys_handler() {
        fail(
            exit_code::GENERIC_ERROR,
            format!("cannot install the SIGSYS handler: {e}"),
        );
    }
    let mut controller = Controller::new(&args.id, cfg, exit.clone(), filters.clone());
    let api_sock = (!args.no_api && !is_run).then(|| PathBuf::from(&args.api_sock));
    if let Some(path) = &api_sock {
        let api_filters = filters.clone();
        let server = match ApiServer::bind(path) {
            Ok(s) => s.with_thread_init(move || {
                if let Err(e) = api_filters.apply(ThreadKind::Api) {
                    fail(exit_code::GENERIC_ERROR, e);
                }
            }),
            Err(e) => fail(
                exit_code::GENERIC_ERROR,
                format!("cannot serve the API on {}: {e}", path.display()),
            ),
        };
        let _ = API_SOCKET.set(server.socket_file());
        let (req_tx, req_rx) = std::sync::mpsc::channel();
        let (resp_tx, resp_rx) = std::sync::mpsc::channel();
        let evt = match EventFd::new(libc::EFD_NONBLOCK).and_then(|e| Ok((e.try_clone()?, e))) {
            Ok(pair) => pair,
            Err(e) => fail(
                exit_code::GENERIC_ERROR,
                format!("cannot create an eventfd: {e}"),
            ),
        };
        if let Err(e) = server.spawn(args.http_api_max_payload_size, req_tx, evt.0, resp_rx) {
            fail(
                exit_code::GENERIC_ERROR,
                format!("cannot start the API thread: {e}"),
            );
        }
        controller = controller.with_api(ApiLink {
            evt: evt.1,
            requests: req_rx,
            responses: resp_tx,
        });
    }

    record_startup(
        &args.start_time_us,
        &args.start_time_cpu_us,
        &args.parent_cpu_time_us,
        start,
    );
    metrics::flush();

    if let Some(boot) = boot {
        if let Err(e) = controller.start(boot.images(), start) {
            fail(start_error_code(&e), e);
        }
    } else if api_sock.is_some() {
        // The socket already accepts; use the wait for the client to make what InstanceStart
        // would otherwise make on its critical path.
        controller.prepare_kvm();
    }
    // The event loop is where this thread first reads what a client or the guest controls
    // (API requests, device queues, the console), so its filter goes on here: for a
    // config-file boot the kernel compiles it while the guest already runs on the other core.
    if let Err(e) = filters.apply(ThreadKind::Vmm) {
        fail(exit_code::GENERIC_ERROR, e);
    }

    let mut em = match vmm::Manager::new() {
        Ok(em) => em,
        Err(e) => fail(
            exit_code::GENERIC_ERROR,
            format!("cannot create the event loop: {e:?}"),
        ),
    };
    match StopWatcher::new(&exit) {
        Ok(w) => vmm::add_subscriber(&mut em, w),
        Err(e) => fail(exit_code::GENERIC_ERROR, e),
    }
    let controller = Arc::new(Mutex::new(controller));
    em.add_subscriber(controller.clone() as vmm::Subscriber);

    let code = vmm::run_until_stopped(&mut em, &exit);
    let ctl = controller.lock().unwrap_or_else(|e| e.into_inner());
    // The guest's last console bytes may still sit in the coalesced ring or a partial line.
    if let Some(vm) = ctl.microvm() {
        vm.vcpu_ctx.drain_coalesced();
        ember::devices::bus::lock(&vm.serial).flush_output();
    }
    signal::restore_terminal();
    log::info!("Stopping the microVM with exit code {code}");
    metrics::flush();
    if let Some(file) = API_SOCKET.get() {
        ember::api::server::wait_for_responses(std::time::Duration::from_millis(100));
        file.remove();
    }
    if let Some(fd) = ctl.kvm_vm_fd() {
        ember::vstate::vm::detach_teardown(fd);
    }
    std::process::exit(code);
}

/// What boots at once, without the API: the files a command line or config file named,
/// opened once, or the guest built into ember.
enum Boot {
    Files(BootFiles, OpenedFiles),
    Builtin,
}

impl Boot {
    fn images(&self) -> BootImages<'_> {
        match self {
            Boot::Files(boot, files) => BootImages::Files(boot, &files.drives),
            Boot::Builtin => BootImages::Builtin(BUILTIN_GUEST),
        }
    }
}

fn record_startup(
    start_us: &Option<u64>,
    start_cpu_us: &Option<u64>,
    parent_cpu_us: &Option<u64>,
    start: Timestamp,
) {
    let now = Timestamp::now();
    let api = &metrics::METRICS.api_server;
    api.process_startup_time_us.store(
        now.wall_us
            .saturating_sub(start_us.unwrap_or(start.wall_us)),
    );
    api.process_startup_time_cpu_us
        .store(now.cpu_us.saturating_sub(start_cpu_us.unwrap_or(0)) + parent_cpu_us.unwrap_or(0));
}
