//! Compiles a seccompiler JSON policy into filters that find the syscall by binary search.
//!
//! seccompiler emits one linear chain of syscall-number comparisons. When a filter is
//! installed, the kernel runs it once for every syscall number (about 450) to build its
//! allow-cache (`seccomp_cache_prepare`), so a chain of n syscalls costs about 450·n emulated
//! instructions: 0.5 ms for the vmm filter on these hosts, at every VM start. Here seccompiler
//! compiles each syscall's rules on their own, and the blocks become the leaves of a tree of
//! `JGE` comparisons: install costs about 450·log2(n) and every syscall at run time is found
//! in log2(n) steps. Syscalls allowed whatever their arguments share leaves of up to four, which
//! halves the program (the JIT's part of the install cost grows with its length), and all
//! leaves jump to one shared return per action, which takes off another quarter. What each
//! syscall may do is what seccompiler compiled (blocks that allow a syscall whatever its
//! arguments are only regrouped), checked by an interpreter in the tests.
//!
//! The filters of the vCPU and API threads start with a load of an argument, which they do not
//! use. The kernel's allow-cache walk gives up on a filter at its first load of anything but
//! the number or the architecture, so it stops at once for every number instead of walking
//! the tree about 900 times: 25 µs less per vCPU at every VM start. The price is that no
//! syscall of those threads skips the filter at run time (about 30 ns each), which they hardly
//! notice: a vCPU thread's busy syscall is KVM_RUN, which takes an argument check anyway. The
//! vmm thread, which moves every device's data, keeps its allow-cache (1-5% less VMM CPU per
//! Gbit in the network and vsock benches).
//!
//! Shared with build.rs (which compiles the built-in policy), so it depends only on
//! seccompiler and serde_json.

use std::collections::{BTreeMap, HashMap};

use seccompiler::{sock_filter, BpfProgram, TargetArch};
use serde_json::Value;

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JMP_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JMP_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JMP_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
/// Classic BPF's program length limit (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// The thread whose filter keeps the kernel's allow-cache (see the top of this file).
const IO_THREAD: &str = "vmm";
/// Offset of the first argument in `struct seccomp_data`.
const SECCOMP_DATA_ARGS: u32 = 16;
/// Instructions before the syscall dispatch in seccompiler's output: the architecture check
/// (load arch, compare, kill) and the load of the syscall number.
const PROLOGUE: usize = 4;
/// x86-64's clone3, and what a filter that does not name it answers (see `Tree::finish`).
const SYS_CLONE3: u32 = 435;
const RET_ENOSYS: u32 = 0x0005_0000 | 38; // SECCOMP_RET_ERRNO | ENOSYS

/// Every thread's filter of the JSON policy `json`, as a binary-search program.
pub fn compile(json: &[u8]) -> Result<HashMap<String, BpfProgram>, String> {
    // seccompiler's own compile of the whole policy: its errors read as they always do, and a
    // thread with no syscalls is just its default action. Only needed in those cases.
    let linear = || seccompiler::compile_from_json(json, TargetArch::x86_64);
    let doc: BTreeMap<String, Value> = serde_json::from_slice(json).map_err(|e| e.to_string())?;

    // One filter per (thread, syscall), all compiled by one seccompiler call: each call
    // builds its syscall table anew, which per syscall cost milliseconds in all.
    let mut parts: Vec<Part> = Vec::new();
    let mut split = serde_json::Map::new();
    for (thread, filter) in &doc {
        let entries = filter
            .get("filter")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{thread}: no \"filter\" list"))?;
        // The rules of a syscall, in the policy's order (seccompiler merges them the same way).
        let mut by_syscall: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for e in entries {
            let name = e
                .get("syscall")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{thread}: a rule without \"syscall\""))?;
            by_syscall.entry(name).or_default().push(e.clone());
        }
        for (name, rules) in by_syscall {
            let word_set = one_word_set(&rules);
            // The thread's filter (actions and all) with this syscall's rules only; cloned
            // key by key, not with the whole rule list.
            let mut one = serde_json::Map::new();
            if let Some(o) = filter.as_object() {
                for (k, v) in o.iter().filter(|(k, _)| k.as_str() != "filter") {
                    one.insert(k.clone(), v.clone());
                }
            }
            one.insert("filter".into(), Value::Array(rules));
            split.insert(parts.len().to_string(), Value::Object(one));
            parts.push(Part {
                thread: thread.clone(),
                name: name.to_string(),
                word_set,
            });
        }
    }
    let bytes = serde_json::to_vec(&split).map_err(|e| e.to_string())?;
    let mut compiled = match seccompiler::compile_from_json(bytes.as_slice(), TargetArch::x86_64) {
        Ok(m) => m,
        Err(e) => return Err(linear().err().unwrap_or(e).to_string()),
    };

    let mut trees: BTreeMap<&str, Tree> = BTreeMap::new();
    for (i, part) in parts.iter().enumerate() {
        let prog = compiled
            .remove(&i.to_string())
            .ok_or_else(|| format!("{}: {}: not compiled", part.thread, part.name))?;
        trees
            .entry(part.thread.as_str())
            .or_default()
            .add(part, prog)?;
    }
    let mut out = HashMap::with_capacity(doc.len());
    for thread in doc.keys() {
        let prog = match trees.remove(thread.as_str()) {
            Some(t) => t.finish(thread)?,
            // No syscalls at all: the linear program is just the default action.
            None => linear()
                .map_err(|e| e.to_string())?
                .remove(thread)
                .ok_or_else(|| format!("{thread}: not compiled"))?,
        };
        out.insert(thread.clone(), prog);
    }
    Ok(out)
}

/// One syscall's rules of one thread's filter.
struct Part {
    thread: String,
    name: String,
    word_set: Option<(u32, Vec<u32>)>,
}

/// A thread's filter being assembled: seccompiler's prologue and one block per syscall.
#[derive(Default)]
struct Tree {
    prologue: Option<Vec<sock_filter>>,
    blocks: Vec<(u32, Vec<sock_filter>)>,
    /// The thread's mismatch action: the last instruction of seccompiler's output (a
    /// compacted block ends in its match action instead, so it is taken from there).
    default: u32,
}

impl Tree {
    /// Adds the block of `prog`, seccompiler's filter for `part`'s rules alone:
    /// [arch check (3), load nr, JEQ nr ... (the block), default action].
    fn add(&mut self, part: &Part, prog: BpfProgram) -> Result<(), String> {
        let (thread, name) = (&part.thread, &part.name);
        let well_formed = prog.len() > PROLOGUE + 1
            && prog[PROLOGUE - 1].code == LD_W_ABS
            && prog[PROLOGUE - 1].k == 0
            && prog[PROLOGUE].code == JMP_JEQ_K;
        if !well_formed {
            return Err(format!(
                "{thread}: {name}: unexpected seccompiler output layout"
            ));
        }
        match &self.prologue {
            None => self.prologue = Some(prog[..PROLOGUE].to_vec()),
            Some(p) if !same(p, &prog[..PROLOGUE]) => {
                return Err(format!("{thread}: {name}: differing prologues"))
            }
            Some(_) => {}
        }
        let nr = prog[PROLOGUE].k;
        self.default = prog[prog.len() - 1].k;
        let block = &prog[PROLOGUE..];
        let compact = part
            .word_set
            .as_ref()
            .and_then(|(index, vals)| word_set_block(nr, *index, vals, block));
        self.blocks
            .push((nr, compact.unwrap_or_else(|| block.to_vec())));
        Ok(())
    }

    fn finish(mut self, thread: &str) -> Result<BpfProgram, String> {
        let mut out = self
            .prologue
            .ok_or_else(|| format!("{thread}: no syscalls"))?;
        // glibc starts threads with clone3 and falls back to clone when clone3 answers ENOSYS.
        // clone3's flags are in memory, where a filter cannot read them, so a policy that
        // leaves clone3 out gets ENOSYS for it rather than its default action: threads still
        // start, through a clone whose flags the policy can pin (and policies written for
        // Firecracker, whose musl build never calls clone3, work as they are).
        if !self.blocks.iter().any(|b| b.0 == SYS_CLONE3) {
            const RET_K: u16 = 0x06;
            let default = self.default;
            self.blocks.push((
                SYS_CLONE3,
                vec![
                    insn(JMP_JEQ_K, SYS_CLONE3, 0, 1),
                    insn(RET_K, RET_ENOSYS, 0, 0),
                    insn(RET_K, default, 0, 0),
                ],
            ));
        }
        self.blocks.sort_by_key(|b| b.0);
        out.extend(search(&bucket(self.blocks)));
        let mut out = share_returns(out);
        if thread != IO_THREAD {
            // Jumps are relative: putting the load first moves nothing else.
            out.insert(0, insn(LD_W_ABS, SECCOMP_DATA_ARGS, 0, 0));
        }
        if out.len() >= MAX_INSNS {
            return Err(format!("{thread}: {} instructions is too long", out.len()));
        }
        Ok(out)
    }
}

/// The argument and its values when every rule of a syscall is one `dword` `eq` test of the
/// same argument (the ioctl request lists); `None` for anything else.
fn one_word_set(rules: &[Value]) -> Option<(u32, Vec<u32>)> {
    let mut index = None;
    let mut vals = Vec::with_capacity(rules.len());
    for r in rules {
        let [a] = r.get("args")?.as_array()?.as_slice() else {
            return None;
        };
        if a.get("type")?.as_str()? != "dword" || a.get("op")?.as_str()? != "eq" {
            return None;
        }
        let i = u32::try_from(a.get("index")?.as_u64()?).ok()?;
        if *index.get_or_insert(i) != i {
            return None;
        }
        vals.push(u32::try_from(a.get("val")?.as_u64()?).ok()?);
    }
    Some((index?, vals))
}

/// seccompiler spends five instructions per rule (two jumps, a load, a compare, a return);
/// a set of values of one argument needs a load and a compare each:
/// `[JEQ nr; LD arg; JEQ v1 .. JEQ vn; RET mismatch; RET match]`. The actions are taken from
/// seccompiler's `block` (its last instruction is the default action).
fn word_set_block(
    nr: u32,
    index: u32,
    vals: &[u32],
    block: &[sock_filter],
) -> Option<Vec<sock_filter>> {
    const RET_K: u16 = 0x06;
    let n = vals.len();
    let miss = block.last()?.k;
    let hit = block.iter().find(|i| i.code == RET_K && i.k != miss)?.k;
    let nr_miss = u8::try_from(n + 1).ok()?;
    let mut b = Vec::with_capacity(n + 4);
    b.push(insn(JMP_JEQ_K, nr, 0, nr_miss));
    // The low half of the argument (x86-64 is little-endian), as seccompiler's `dword`.
    b.push(insn(LD_W_ABS, SECCOMP_DATA_ARGS + 8 * index, 0, 0));
    for (i, &v) in vals.iter().enumerate() {
        b.push(insn(JMP_JEQ_K, v, (n - i) as u8, 0));
    }
    b.push(insn(RET_K, miss, 0, 0));
    b.push(insn(RET_K, hit, 0, 0));
    Some(b)
}

fn same(a: &[sock_filter], b: &[sock_filter]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.code == y.code && x.jt == y.jt && x.jf == y.jf && x.k == y.k)
}

fn insn(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The search over `blocks` (sorted by syscall number): a tree of `JGE`s whose leaves are the
/// blocks themselves; a block's own `JEQ` sends any other number to the default action.
fn search(blocks: &[(u32, Vec<sock_filter>)]) -> Vec<sock_filter> {
    match blocks {
        [] => Vec::new(),
        [(_, b)] => shrink(b),
        _ => {
            let mid = blocks.len() / 2;
            let low = search(&blocks[..mid]);
            let high = search(&blocks[mid..]);
            let nr = blocks[mid].0;
            // nr >= blocks[mid] goes to the high half, past the low one; a JGE reaches 255
            // ahead at most, so a longer low half is stepped over with a JA.
            let mut out = Vec::with_capacity(low.len() + high.len() + 2);
            match u8::try_from(low.len()) {
                Ok(skip) => out.push(insn(JMP_JGE_K, nr, skip, 0)),
                Err(_) => {
                    out.push(insn(JMP_JGE_K, nr, 0, 1));
                    out.push(insn(JMP_JA, low.len() as u32, 0, 0));
                }
            }
            out.extend(low);
            out.extend(high);
            out
        }
    }
}

/// Syscalls allowed whatever their arguments, at most this many per leaf: a leaf of n of them
/// costs n + 2 instructions where n leaves of one cost 3n + (n - 1) comparisons in the tree.
/// The install cost (the kernel's JIT, and its allow-cache walk of every syscall number) grows
/// with both the length and the path, and 4 keeps the path as short as a one-syscall tree's.
const BUCKET: usize = 4;

/// Merges runs of neighbouring argument-free blocks with the same actions into leaves of up to
/// `BUCKET` syscalls: `[JEQ a; JEQ b; ..; JEQ z; RET match; RET mismatch]`, keyed by the first.
/// Like any leaf it is reached for every number from its key up to the next leaf's key, and
/// sends the numbers it does not name to the mismatch action.
fn bucket(blocks: Vec<(u32, Vec<sock_filter>)>) -> Vec<(u32, Vec<sock_filter>)> {
    const RET_K: u16 = 0x06;
    let plain = |b: &[sock_filter]| match shrink(b).as_slice() {
        [eq, hit, miss] if eq.code == JMP_JEQ_K && hit.code == RET_K && miss.code == RET_K => {
            Some((eq.k, hit.k, miss.k))
        }
        _ => None,
    };
    let mut out: Vec<(u32, Vec<sock_filter>)> = Vec::with_capacity(blocks.len());
    // The syscalls of the leaf being filled, and its actions.
    let mut run: Vec<u32> = Vec::new();
    let mut actions = (0, 0);
    let flush = |run: &mut Vec<u32>, (hit, miss): (u32, u32), out: &mut Vec<_>| {
        let n = run.len();
        if n == 0 {
            return;
        }
        let mut b = Vec::with_capacity(n + 2);
        for (i, &nr) in run.iter().enumerate() {
            // To the match action n - i - 1 ahead; the last one falls to the mismatch after it.
            let last = i + 1 == n;
            b.push(insn(JMP_JEQ_K, nr, (n - i - 1) as u8, u8::from(last)));
        }
        b.push(insn(RET_K, hit, 0, 0));
        b.push(insn(RET_K, miss, 0, 0));
        out.push((run[0], b));
        run.clear();
    };
    for (nr, b) in blocks {
        match plain(&b) {
            Some((_, hit, miss)) => {
                if run.len() == BUCKET || (!run.is_empty() && actions != (hit, miss)) {
                    flush(&mut run, actions, &mut out);
                }
                actions = (hit, miss);
                run.push(nr);
            }
            None => {
                flush(&mut run, actions, &mut out);
                out.push((nr, b));
            }
        }
    }
    flush(&mut run, actions, &mut out);
    out
}

/// Every leaf ends in its own `RET allow` and `RET trap`; jumping to one shared copy of each
/// at the end of the program instead makes it a quarter shorter (and the kernel's JIT, whose
/// time grows with the length, a fifth faster). A `RET` that straight-line code falls into
/// stays where it is; if a jump would reach further than a classic-BPF offset (255), the
/// program is returned as it was.
fn share_returns(p: Vec<sock_filter>) -> Vec<sock_filter> {
    const RET_K: u16 = 0x06;
    const CLASS_JMP: u16 = 0x05;
    let is_jump = |i: &sock_filter| i.code & 0x07 == CLASS_JMP;
    // A RET can move when nothing falls through into it: not the first instruction (where
    // the program starts), and after a jump or another RET.
    let movable: Vec<bool> = (0..p.len())
        .map(|i| p[i].code == RET_K && i > 0 && (is_jump(&p[i - 1]) || p[i - 1].code == RET_K))
        .collect();
    let mut shared: Vec<u32> = p
        .iter()
        .zip(&movable)
        .filter(|(_, &m)| m)
        .map(|(i, _)| i.k)
        .collect();
    shared.sort_unstable();
    shared.dedup();
    // Where each old instruction ends up.
    let kept = movable.iter().filter(|&&m| !m).count();
    let mut at = Vec::with_capacity(p.len());
    let mut n = 0;
    for (i, &m) in p.iter().zip(&movable) {
        if m {
            let j = shared.iter().position(|&k| k == i.k).unwrap_or(0);
            at.push(kept + j);
        } else {
            at.push(n);
            n += 1;
        }
    }
    let mut out = Vec::with_capacity(kept + shared.len());
    for old in 0..p.len() {
        if movable[old] {
            continue;
        }
        let here = at[old] + 1;
        // The new offset of a jump `off` past `old`; None if it leaves the program.
        let to = |off: usize| at.get(old + 1 + off).map(|&t| t - here);
        let mut i = insn(p[old].code, p[old].k, p[old].jt, p[old].jf);
        if i.code == JMP_JA {
            match to(i.k as usize).map(u32::try_from) {
                Some(Ok(k)) => i.k = k,
                _ => return p,
            }
        } else if is_jump(&i) {
            match (to(usize::from(i.jt)), to(usize::from(i.jf))) {
                (Some(t), Some(f)) => match (u8::try_from(t), u8::try_from(f)) {
                    (Ok(t), Ok(f)) => (i.jt, i.jf) = (t, f),
                    _ => return p,
                },
                _ => return p,
            }
        }
        out.push(i);
    }
    out.extend(shared.iter().map(|&k| insn(RET_K, k, 0, 0)));
    out
}

/// seccompiler's block for a syscall allowed whatever its arguments is
/// `[JEQ nr 0 1; JA 1; JA 2; RET match; RET mismatch]`, then the default action; on its own
/// that is `[JEQ nr 0 1; RET match; RET default]`. Every other block is kept as it is.
fn shrink(b: &[sock_filter]) -> Vec<sock_filter> {
    const RET_K: u16 = 0x06;
    match b {
        [eq, ja1, ja2, hit, miss, default]
            if ja1.code == JMP_JA
                && ja1.k == 1
                && ja2.code == JMP_JA
                && ja2.k == 2
                && hit.code == RET_K
                && miss.code == RET_K
                && default.code == RET_K
                && miss.k == default.k =>
        {
            vec![
                insn(eq.code, eq.k, 0, 1),
                insn(RET_K, hit.k, 0, 0),
                insn(RET_K, default.k, 0, 0),
            ]
        }
        _ => b.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// seccomp_data: nr, arch, instruction pointer, six arguments.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn word(&self, off: u32) -> u32 {
            match off {
                0 => self.nr,
                4 => self.arch,
                8 | 12 => 0,
                o if (16..64).contains(&o) => {
                    let a = self.args[((o - 16) / 8) as usize];
                    if o % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load at {o}"),
            }
        }
    }

    /// A classic-BPF interpreter for the instructions seccompiler emits; the action and the
    /// number of instructions run.
    fn run(p: &[sock_filter], d: &Data) -> (u32, usize) {
        let (mut pc, mut a, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &p[pc];
            steps += 1;
            pc += 1;
            match i.code {
                LD_W_ABS => a = d.word(i.k),
                JMP_JA => pc += i.k as usize,
                0x54 => a &= i.k,            // BPF_ALU | BPF_AND | BPF_K
                0x06 => return (i.k, steps), // BPF_RET | BPF_K
                c => {
                    let t = match c {
                        JMP_JEQ_K => a == i.k,
                        JMP_JGE_K => a >= i.k,
                        0x25 => a > i.k,      // JGT
                        0x45 => a & i.k != 0, // JSET
                        c => panic!("opcode {c:#x} at {}", pc - 1),
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    /// Every syscall number (native and x32) with all arguments equal to constants of the
    /// program (and their neighbours), and the syscalls the program names with each such value
    /// in one argument at a time, get the same action from both programs.
    fn equivalent(linear: &BpfProgram, tree: &BpfProgram) -> (usize, usize) {
        let mut vals: Vec<u64> = vec![0, u64::MAX];
        for i in linear {
            let k = u64::from(i.k);
            vals.extend([k, k.wrapping_sub(1), k + 1, k << 32]);
        }
        vals.sort_unstable();
        vals.dedup();
        let named: Vec<u32> = linear.iter().map(|i| i.k).filter(|&k| k < 1024).collect();
        let (mut steps_l, mut steps_t) = (0, 0);
        // A tree (not a filter without rules, which stays seccompiler's) answers ENOSYS for
        // clone3 when the policy does not name it.
        let enosys_clone3 = !linear
            .iter()
            .any(|i| i.code == JMP_JEQ_K && i.k == SYS_CLONE3)
            && tree.iter().any(|i| i.code == 0x06 && i.k == RET_ENOSYS);
        let mut check = |d: Data| {
            let (mut l, sl) = run(linear, &d);
            let (t, st) = run(tree, &d);
            if d.nr == SYS_CLONE3 && d.arch == 0xc000_003e && enosys_clone3 {
                l = RET_ENOSYS;
            }
            assert_eq!(l, t, "nr {} arch {:#x} args {:x?}", d.nr, d.arch, d.args);
            steps_l += sl;
            steps_t += st;
        };
        for arch in [0xc000_003e, 0x4000_0003] {
            for nr in (0..520).chain(0x4000_0000..0x4000_0208) {
                for &v in &vals {
                    check(Data {
                        nr,
                        arch,
                        args: [v; 6],
                    });
                }
            }
        }
        for &nr in &named {
            for &v in &vals {
                for j in 0..6 {
                    let mut args = [0; 6];
                    args[j] = v;
                    check(Data {
                        nr,
                        arch: 0xc000_003e,
                        args,
                    });
                }
            }
        }
        (steps_l, steps_t)
    }

    #[test]
    fn builtin_policy_trees_match_seccompiler() {
        let json = include_bytes!("../../resources/seccomp/x86_64-unknown-linux-gnu.json");
        let linear = seccompiler::compile_from_json(&json[..], TargetArch::x86_64).unwrap();
        let trees = compile(json).unwrap();
        assert_eq!(linear.len(), trees.len());
        for (name, l) in &linear {
            let t = &trees[name];
            let (sl, st) = equivalent(l, t);
            // The point of the tree: far fewer instructions per syscall.
            assert!(st * 3 < sl, "{name}: tree {st} vs linear {sl} steps");
            // One RET per action (allow, trap, kill for a foreign architecture, clone3's
            // ENOSYS), all at the end.
            let rets = t.iter().filter(|i| i.code == 0x06).count();
            assert!(rets <= 4, "{name}: {rets} RETs");
            // The kernel's allow-cache walk stops at the first instruction for every number,
            // but for the vmm thread's filter, which it walks to the end.
            for arch in [0xc000_003e, 0x4000_0003] {
                for nr in 0..1024 {
                    let steps = cache_walk(t, nr, arch);
                    assert_eq!(steps == 1, name != IO_THREAD, "{name}: nr {nr}: {steps}");
                }
            }
        }
    }

    /// How many instructions the kernel's allow-cache preparation (`seccomp_is_const_allow`)
    /// emulates for `nr` before it reaches a return or an instruction it cannot emulate (a
    /// load of anything but the number or the architecture).
    fn cache_walk(p: &[sock_filter], nr: u32, arch: u32) -> usize {
        let (mut pc, mut a, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &p[pc];
            steps += 1;
            pc += 1;
            match (i.code, i.k) {
                (LD_W_ABS, 0) => a = nr,
                (LD_W_ABS, 4) => a = arch,
                (JMP_JA, k) => pc += k as usize,
                (JMP_JEQ_K, k) => pc += usize::from(if a == k { i.jt } else { i.jf }),
                (JMP_JGE_K, k) => pc += usize::from(if a >= k { i.jt } else { i.jf }),
                _ => return steps,
            }
        }
    }

    #[test]
    fn argument_rules_and_empty_filters() {
        // Rules with arguments, the same syscall listed twice, and a filter with no rules.
        let doc = serde_json::json!({
            "a": {"mismatch_action": "trap", "match_action": "allow", "filter": [
                {"syscall": "read"}, {"syscall": "write"}, {"syscall": "close"},
                {"syscall": "ioctl", "args": [
                    {"index": 1, "type": "dword", "op": "eq", "val": 0xae80}]},
                {"syscall": "mmap"},
                {"syscall": "ioctl", "args": [
                    {"index": 1, "type": "dword", "op": "eq", "val": 0x4008_ae9a_u32},
                    {"index": 0, "type": "qword", "op": {"masked_eq": 0xff}, "val": 7}]},
                {"syscall": "fcntl", "args": [
                    {"index": 1, "type": "dword", "op": "eq", "val": 1}]},
                {"syscall": "fcntl", "args": [
                    {"index": 1, "type": "dword", "op": "eq", "val": 1030}]},
                {"syscall": "prctl", "args": [
                    {"index": 0, "type": "dword", "op": "eq", "val": 38}]},
                {"syscall": "prctl", "args": [
                    {"index": 1, "type": "dword", "op": "eq", "val": 15}]},
                {"syscall": "kill", "args": [
                    {"index": 1, "type": "qword", "op": "eq", "val": 9}]},
                {"syscall": "dup", "args": [
                    {"index": 0, "type": "dword", "op": "ne", "val": 3}]},
                {"syscall": "futex", "args": [
                    {"index": 1, "type": "dword", "op": "ge", "val": 3},
                    {"index": 2, "type": "qword", "op": "lt", "val": 9}]}]},
            "b": {"mismatch_action": {"errno": 1}, "match_action": "allow", "filter": []},
        });
        let json = serde_json::to_vec(&doc).unwrap();
        let linear = seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64).unwrap();
        let trees = compile(&json).unwrap();
        for (name, l) in &linear {
            equivalent(l, &trees[name]);
        }
    }

    #[test]
    fn clone3_answers_enosys_unless_the_policy_names_it() {
        let clone3 = |t: &BpfProgram| {
            let d = Data {
                nr: SYS_CLONE3,
                arch: 0xc000_003e,
                args: [0; 6],
            };
            run(t, &d).0
        };
        let doc = serde_json::json!({
            "without": {"mismatch_action": "trap", "match_action": "allow", "filter": [
                {"syscall": "read"},
                {"syscall": "clone", "args": [
                    {"index": 0, "type": "dword", "op": "eq", "val": 0x3d0f00}]}]},
            "with": {"mismatch_action": "trap", "match_action": "allow", "filter": [
                {"syscall": "read"}, {"syscall": "clone3"}]},
        });
        let json = serde_json::to_vec(&doc).unwrap();
        let trees = compile(&json).unwrap();
        assert_eq!(clone3(&trees["without"]), RET_ENOSYS);
        assert_eq!(clone3(&trees["with"]), 0x7fff_0000); // SECCOMP_RET_ALLOW
                                                         // Every other number gets what seccompiler's program gives it, those past clone3
                                                         // included (the clone3 leaf is reached for them: it must send them to the mismatch
                                                         // action, whatever the policy's first syscall compiles to).
        let linear = seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64).unwrap();
        for (name, l) in &linear {
            equivalent(l, &trees[name]);
        }
        let trap = |nr| {
            let d = Data {
                nr,
                arch: 0xc000_003e,
                args: [0; 6],
            };
            run(&trees["without"], &d).0
        };
        for nr in [436, 999, 0x4000_0001] {
            assert_eq!(trap(nr), 0x0003_0000, "nr {nr:#x}"); // SECCOMP_RET_TRAP
        }
        // The built-in policy leaves clone3 out everywhere: glibc falls back to a clone whose
        // flags the vmm thread's filter pins.
        let json = include_bytes!("../../resources/seccomp/x86_64-unknown-linux-gnu.json");
        for (name, t) in compile(json).unwrap() {
            assert_eq!(clone3(&t), RET_ENOSYS, "{name}");
        }
    }

    #[test]
    fn wide_searches_step_over_long_halves() {
        // 400 blocks [JEQ nr; RET index + 1; RET 0]: the low half outgrows a JGE's reach.
        let nrs: Vec<u32> = (0..400).map(|i| i * 3 + 1).collect();
        let blocks: Vec<(u32, Vec<sock_filter>)> = nrs
            .iter()
            .enumerate()
            .map(|(i, &nr)| {
                let b = vec![
                    insn(JMP_JEQ_K, nr, 0, 1),
                    insn(0x06, i as u32 + 1, 0, 0),
                    insn(0x06, 0, 0, 0),
                ];
                (nr, b)
            })
            .collect();
        let mut p = vec![insn(LD_W_ABS, 0, 0, 0)];
        p.extend(search(&blocks));
        assert!(p.iter().any(|i| i.code == JMP_JGE_K && i.jf == 1));
        // Shared returns would be out of a jump's reach: the program stays as it is.
        assert!(same(&share_returns(p.clone()), &p));
        for nr in 0..1300 {
            let d = Data {
                nr,
                arch: 0,
                args: [0; 6],
            };
            let want = nrs
                .iter()
                .position(|&n| n == nr)
                .map_or(0, |i| i as u32 + 1);
            let (got, steps) = run(&p, &d);
            assert_eq!(got, want, "nr {nr}");
            assert!(steps < 30, "nr {nr}: {steps} steps");
        }
    }

    #[test]
    fn shared_returns_keep_every_decision() {
        // Random valid programs over the syscall number: loads, JEQ/JGE with any offsets
        // (0 included), JA, and RETs of three actions, the first instruction a RET at times.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rnd = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(n)) as u32
        };
        for _ in 0..2000 {
            let len = 1 + rnd(60) as usize;
            let mut p = Vec::with_capacity(len);
            for i in 0..len {
                let left = (len - i - 1) as u32;
                let pick = if left == 0 { 0 } else { rnd(5) };
                p.push(match pick {
                    0 => insn(0x06, rnd(3), 0, 0),
                    1 => insn(LD_W_ABS, 0, 0, 0),
                    2 => insn(JMP_JA, rnd(left), 0, 0),
                    3 => insn(JMP_JEQ_K, rnd(8), rnd(left) as u8, rnd(left) as u8),
                    _ => insn(JMP_JGE_K, rnd(8), rnd(left) as u8, rnd(left) as u8),
                });
            }
            let q = share_returns(p.iter().map(|i| insn(i.code, i.k, i.jt, i.jf)).collect());
            assert!(q.len() <= p.len() + 3);
            for nr in 0..10 {
                let d = Data {
                    nr,
                    arch: 0,
                    args: [0; 6],
                };
                assert_eq!(run(&p, &d).0, run(&q, &d).0, "nr {nr}: {p:?} -> {q:?}");
            }
        }
    }

    #[test]
    fn errors_are_seccompilers() {
        let e = compile(br#"{"a":{"mismatch_action":"trap","match_action":"allow","filter":[{"syscall":"nope"}]}}"#)
            .unwrap_err();
        assert!(e.contains("nope"), "{e}");
        assert!(compile(b"{").is_err());
    }
}
