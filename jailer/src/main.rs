//! `ember-jailer`: Firecracker's jailer for ember. It validates the whole request first, then
//! builds `<base>/<exec name>/<id>/root`, joins the network namespace and cgroups, pivots into
//! the jail, creates the device nodes, optionally daemonizes and/or enters a new PID namespace,
//! and execs the VMM as uid:gid.
//!
//! A jail root may be prepared by the caller beforehand (kernel, config, named pipes copied or
//! hard-linked into `<base>/<exec name>/<id>/root`): that is accepted. What is refused as "already
//! jailed" is a root that already holds `<exec name>`, i.e. one a jailer has run in before.

mod args;
mod cgroup;
mod jail;
mod process;
mod sys;

use std::fmt;
use std::path::Path;

use args::{ArgsError, Config, Parsed};
use cgroup::CgroupError;
use jail::{Created, JailError};
use process::ProcessError;

/// Exit code of every failure, as Firecracker's jailer.
const EXIT_FAILURE: i32 = 1;

#[derive(Debug)]
enum Error {
    Args(ArgsError),
    Cgroup(CgroupError),
    Jail(JailError),
    Process(ProcessError),
    NonUtf8Arg(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Args(e) => e.fmt(f),
            Error::Cgroup(e) => e.fmt(f),
            Error::Jail(e) => e.fmt(f),
            Error::Process(e) => e.fmt(f),
            Error::NonUtf8Arg(a) => write!(f, "the argument {a:?} is not valid UTF-8"),
        }
    }
}

impl From<ArgsError> for Error {
    fn from(e: ArgsError) -> Error {
        Error::Args(e)
    }
}
impl From<CgroupError> for Error {
    fn from(e: CgroupError) -> Error {
        Error::Cgroup(e)
    }
}
impl From<JailError> for Error {
    fn from(e: JailError) -> Error {
        Error::Jail(e)
    }
}
impl From<ProcessError> for Error {
    fn from(e: ProcessError) -> Error {
        Error::Process(e)
    }
}

/// When the jailer started, for the VMM's start-up metrics.
#[derive(Clone, Copy)]
struct StartTime {
    /// CLOCK_MONOTONIC.
    wall_us: u64,
    /// CLOCK_PROCESS_CPUTIME_ID.
    cpu_us: u64,
}

fn fail(e: impl fmt::Display) -> ! {
    eprintln!("ember-jailer: {e}");
    std::process::exit(EXIT_FAILURE);
}

fn main() {
    let start = StartTime {
        wall_us: sys::clock_us(libc::CLOCK_MONOTONIC),
        cpu_us: sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
    };
    // Nothing the caller left open may reach the VMM, nor anything of its environment.
    sys::close_fds_above_stdio();
    let argv = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| Error::NonUtf8Arg(a.to_string_lossy().into_owned()))
        })
        .collect::<Result<Vec<String>, Error>>()
        .unwrap_or_else(|e| fail(e));
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }

    let cfg = match args::parse(&argv) {
        Ok(Parsed::Run(cfg)) => cfg,
        Ok(Parsed::Print(text)) => {
            println!("{}", text.trim_end());
            std::process::exit(0);
        }
        Err(e) => fail(e),
    };
    let err = run(&cfg, start);
    fail(err);
}

/// Does the whole job; returns only on failure (success ends in exec).
fn run(cfg: &Config, start: StartTime) -> Error {
    // 1. Validate everything before creating anything.
    let mut exec = match cfg.check_host() {
        Ok(f) => f,
        Err(e) => return e.into(),
    };
    let netns = match cfg.netns.as_deref().map(process::open_netns).transpose() {
        Ok(ns) => ns,
        Err(e) => return e.into(),
    };
    let cgroups = match cgroup::plan(
        &cfg.cgroups,
        cfg.cgroup_version,
        &cfg.parent_cgroup,
        &cfg.id,
    ) {
        Ok(p) => p,
        Err(e) => return e.into(),
    };
    let userfaultfd = jail::host_userfaultfd();
    let dev_null = match cfg.daemonize.then(process::open_dev_null).transpose() {
        Ok(d) => d,
        Err(e) => return e.into(),
    };

    // 2. Host side: the jail directory, namespace, limits, cgroups. A failure here removes
    // what was created.
    let root = cfg.root_dir();
    let mut created = Created::default();
    let host_side = (|| -> Result<(), Error> {
        jail::prepare(
            &root,
            &cfg.exec_file,
            &mut exec,
            &cfg.exec_name,
            cfg.uid,
            cfg.gid,
            &mut created,
        )?;
        if let (Some(path), Some(ns)) = (&cfg.netns, &netns) {
            process::join_netns(path, ns)?;
        }
        process::set_rlimits(&cfg.rlimits)?;
        if let Some(plan) = &cgroups {
            plan.apply(std::process::id())?;
        }
        Ok(())
    })();
    if let Err(e) = host_side {
        created.rollback();
        return e;
    }
    drop(netns);
    drop(exec);

    // 3. Inside the jail.
    if let Err(e) = jail::pivot_into(&root) {
        return e.into();
    }
    if let Err(e) = jail::make_devices(cfg.uid, cfg.gid, userfaultfd) {
        return e.into();
    }

    // 4. Detach and/or fork into a new PID namespace; the forked child's CPU clock restarts.
    let cpu_before_fork = sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let mut forked = false;
    if let Some(dev_null) = dev_null {
        if let Err(e) = process::daemonize(dev_null) {
            return e.into();
        }
        forked = true;
    }
    if cfg.new_pid_ns {
        let pid_file = Path::new("/").join(format!("{}.pid", cfg.exec_name));
        if let Err(e) = process::enter_new_pid_ns(&pid_file) {
            return e.into();
        }
        forked = true;
    }

    // 5. Become uid:gid and exec the VMM.
    let mut vmm_args = vec![
        "--id".to_string(),
        cfg.id.clone(),
        "--start-time-us".to_string(),
        start.wall_us.to_string(),
        "--start-time-cpu-us".to_string(),
    ];
    if forked {
        vmm_args.push("0".to_string());
        vmm_args.push("--parent-cpu-time-us".to_string());
        vmm_args.push(cpu_before_fork.saturating_sub(start.cpu_us).to_string());
    } else {
        vmm_args.push(start.cpu_us.to_string());
    }
    vmm_args.extend(cfg.vmm_args.iter().cloned());
    let exec_path = Path::new("/").join(&cfg.exec_name);
    process::exec_as(&exec_path, &vmm_args, cfg.uid, cfg.gid).into()
}
