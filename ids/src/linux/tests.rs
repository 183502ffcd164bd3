//! A fake Linux laid out in fake memory: tasks on `init_task.tasks`,
//! threads on `signal->thread_head`, credentials, modules on `modules`; the
//! walkers read it back, and corrupt lists end in errors.

use super::*;
use crate::fake::FakeMemory;
use crate::kallsyms::Symbol;

const INIT: u64 = 0xffff_ffff_8200_0000;
const MODULES: u64 = 0xffff_ffff_8210_0000;
const HEAP: u64 = 0xffff_8880_0100_0000;
const PID_NS: u64 = 0xffff_ffff_8220_0000;

fn offsets(thread_node: bool) -> Offsets {
    crate::fake::offsets(thread_node)
}

fn kernel(o: Offsets) -> Kernel {
    let sym = |addr, name: &str| Symbol {
        addr,
        kind: 'D',
        name: name.into(),
    };
    crate::fake::kernel(
        vec![
            sym(0x2_0000, "current_task"),
            sym(INIT, "init_task"),
            sym(MODULES, "modules"),
            sym(PID_NS, "init_pid_ns"),
            sym(0x3_0000, "runqueues"),
        ],
        o,
        INIT,
    )
}

struct FakeTask {
    pid: u32,
    tgid: u32,
    parent: usize,
    comm: &'static str,
    state: u32,
    exit_state: u32,
    kthread: bool,
    uid: u32,
}

/// Lays out `tasks` (index 0 = init_task) with leaders on init_task.tasks
/// and threads on their leader's signal->thread_head (or thread_group).
fn lay_out(m: &mut FakeMemory, o: &Offsets, tasks: &[FakeTask]) -> Vec<u64> {
    let addr = |i: usize| {
        if i == 0 {
            INIT
        } else {
            HEAP + i as u64 * 0x1000
        }
    };
    let cred = |i: usize| HEAP + 0x10_0000 + i as u64 * 0x100;
    let signal = |i: usize| HEAP + 0x20_0000 + i as u64 * 0x100;
    let addrs: Vec<u64> = (0..tasks.len()).map(addr).collect();
    for (i, t) in tasks.iter().enumerate() {
        let a = addr(i);
        m.put_u32(a + o.task_pid, t.pid);
        m.put_u32(a + o.task_tgid, t.tgid);
        let mut comm = [0u8; 16];
        comm[..t.comm.len()].copy_from_slice(t.comm.as_bytes());
        m.write_virt(a + o.task_comm, &comm);
        m.put_u64(a + o.task_real_parent, addr(t.parent));
        m.put_u64(a + o.task_cred, cred(i));
        m.put_u32(cred(i) + o.cred_uid, t.uid);
        m.put_u32(cred(i) + o.cred_gid, t.uid + 1);
        m.put_u32(a + o.task_state, t.state);
        m.put_u32(a + o.task_exit_state, t.exit_state);
        m.put_u32(a + o.task_flags, if t.kthread { PF_KTHREAD } else { 0 });
        let mm = if t.kthread {
            0
        } else {
            HEAP + 0x50_0000 + i as u64 * 0x100
        };
        m.put_u64(a + o.task_mm, mm);
        m.put_u64(a + o.task_start, 1_000_000 * t.pid as u64);
        let leader = tasks.iter().position(|x| x.pid == t.tgid).unwrap_or(i);
        m.put_u64(a + o.task_signal, signal(leader));
        let threads = tasks.iter().filter(|x| x.tgid == t.tgid).count();
        if let Some(nr) = o.signal_nr_threads {
            m.put_u32(signal(leader) + nr, threads as u32);
        }
    }
    // init_task.tasks: every leader but init.
    let leaders: Vec<usize> = (1..tasks.len())
        .filter(|&i| tasks[i].pid == tasks[i].tgid)
        .collect();
    let mut chain = vec![INIT + o.task_tasks];
    chain.extend(leaders.iter().map(|&i| addr(i) + o.task_tasks));
    link(m, &chain);
    // Threads of each leader.
    for &l in std::iter::once(&0).chain(&leaders) {
        let members: Vec<usize> = (0..tasks.len())
            .filter(|&i| tasks[i].tgid == tasks[l].pid)
            .collect();
        if let (Some(node), Some(head)) = (o.task_thread_node, o.signal_thread_head) {
            let mut c = vec![signal(l) + head];
            c.extend(members.iter().map(|&i| addr(i) + node));
            link(m, &c);
        } else if let Some(tg) = o.task_thread_group {
            let c: Vec<u64> = members.iter().map(|&i| addr(i) + tg).collect();
            link(m, &c);
        }
    }
    addrs
}

/// Makes a circular list through `nodes` (next pointers only).
fn link(m: &mut FakeMemory, nodes: &[u64]) {
    for (i, &n) in nodes.iter().enumerate() {
        m.put_u64(n, nodes[(i + 1) % nodes.len()]);
        m.put_u64(n + 8, nodes[(i + nodes.len() - 1) % nodes.len()]);
    }
}

fn sample() -> Vec<FakeTask> {
    let t = |pid, tgid, parent, comm, state, exit_state, kthread| FakeTask {
        pid,
        tgid,
        parent,
        comm,
        state,
        exit_state,
        kthread,
        uid: if kthread { 0 } else { 1000 },
    };
    vec![
        t(0, 0, 0, "swapper/0", 0, 0, true),
        t(1, 1, 0, "init", 1, 0, false),
        t(2, 2, 0, "kthreadd", 1, 0, true),
        t(3, 3, 2, "kworker/0:0", 0x402, 0, true),
        t(40, 40, 1, "pthreads", 1, 0, false),
        t(41, 40, 1, "pthreads", 1, 0, false),
        t(42, 40, 1, "pthreads", 0, 0, false),
        t(50, 50, 4, "zombie", 0x0, EXIT_ZOMBIE, false),
        t(60, 60, 1, "stopped", 4, 0, false),
    ]
}

fn setup(thread_node: bool) -> (SnapshotCache<FakeMemory>, Kernel) {
    let o = offsets(thread_node);
    let mut m = FakeMemory::new(2);
    lay_out(&mut m, &o, &sample());
    (SnapshotCache::new(m), kernel(o))
}

#[test]
fn ps_lists_processes_and_threads_both_ways() {
    for thread_node in [true, false] {
        let (mut c, k) = setup(thread_node);
        let procs = ps(&mut c, &k, 0, false).unwrap();
        let pids: Vec<u32> = procs.iter().map(|t| t.pid).collect();
        assert_eq!(pids, [1, 2, 3, 40, 50, 60], "thread_node={thread_node}");
        let all = ps(&mut c, &k, 0, true).unwrap();
        let pids: Vec<u32> = all.iter().map(|t| t.pid).collect();
        assert_eq!(pids, [1, 2, 3, 40, 41, 42, 50, 60]);
        let by = |pid| all.iter().find(|t| t.pid == pid).unwrap();
        assert_eq!(by(1).ppid, 0);
        assert_eq!(by(3).ppid, 2);
        assert_eq!(by(42).tgid, 40);
        assert_eq!(by(42).state, 'R');
        assert_eq!(by(40).state, 'S');
        assert_eq!(by(3).state, 'I');
        assert_eq!(by(50).state, 'Z');
        assert_eq!(by(60).state, 'T');
        assert!(by(2).kthread && !by(40).kthread);
        assert_eq!((by(40).uid, by(40).gid), (1000, 1001));
        assert_eq!(by(41).comm, "pthreads");
        assert_eq!(by(50).ppid, 40);
    }
}

#[test]
fn ps_is_one_request_and_threads_one_more() {
    for thread_node in [true, false] {
        let (mut c, k) = setup(thread_node);
        ps(&mut c, &k, 0, false).unwrap();
        assert_eq!(c.inner().stats().requests, 1, "the task list in one walk");
        ps(&mut c, &k, 0, true).unwrap();
        assert_eq!(
            c.inner().stats().requests,
            3,
            "then the task list and the thread lists of multi-threaded processes"
        );
    }
}

/// The sample tasks laid out with the PID IDR over them.
fn with_idr() -> (FakeMemory, Offsets) {
    let mut o = offsets(true);
    let mut m = FakeMemory::new(1);
    let tasks = sample();
    let addrs = lay_out(&mut m, &o, &tasks);
    add_idr(&mut m, &mut o, &addrs, &tasks);
    (m, o)
}

#[test]
fn the_task_list_and_the_pid_idr_agree() {
    let (m, o) = with_idr();
    let mut c = SnapshotCache::new(m);
    let k = kernel(o);
    for threads in [false, true] {
        assert_eq!(
            ps(&mut c, &k, 0, threads).unwrap(),
            ps_by_idr(&mut c, &k, 0, threads).unwrap()
        );
    }
}

#[test]
fn corrupt_task_lists_end_in_errors() {
    let o = offsets(true);
    let mut m = FakeMemory::new(1);
    let addrs = lay_out(&mut m, &o, &sample());
    // A cycle that never returns to the head.
    m.put_u64(addrs[4] + o.task_tasks, addrs[2] + o.task_tasks);
    let mut c = SnapshotCache::new(m);
    let e = ps(&mut c, &kernel(o.clone()), 0, false).unwrap_err();
    assert!(matches!(e, LinuxError::BadList { .. }), "{e}");
    // A pointer into nowhere.
    let mut m = FakeMemory::new(1);
    let addrs = lay_out(&mut m, &o, &sample());
    m.put_u64(addrs[3] + o.task_tasks, 0xffff_8880_dead_0000);
    let mut c = SnapshotCache::new(m);
    assert!(ps(&mut c, &kernel(o.clone()), 0, false).is_err());
    // A user-space pointer.
    let mut m = FakeMemory::new(1);
    let addrs = lay_out(&mut m, &o, &sample());
    m.put_u64(addrs[3] + o.task_tasks, 0x4000);
    let mut c = SnapshotCache::new(m);
    assert!(matches!(
        ps(&mut c, &kernel(o), 0, false),
        Err(LinuxError::BadList { .. })
    ));
}

#[test]
fn lsmod_reads_modules_in_list_order() {
    let o = offsets(true);
    let mut m = FakeMemory::new(1);
    let mods = [("virtio", 0u32, 2i32), ("vsock", 0, 1), ("gone", 3, 1)];
    let addr = |i: usize| 0xffff_ffff_c000_0000 + i as u64 * 0x1000;
    let mut chain = vec![MODULES];
    for (i, (name, state, refs)) in mods.iter().enumerate() {
        let a = addr(i);
        chain.push(a + o.module_list);
        m.put_u32(a + o.module_state, *state);
        m.write_virt(a + o.module_name.offset, name.as_bytes());
        m.put_u32(a + 0x60, *refs as u32);
        let (mem, elem, n, b, s) = o.module_mem.unwrap();
        for t in 0..n {
            m.put_u64(
                a + mem + t * elem + b,
                0xffff_ffff_c100_0000 + i as u64 * 0x10_0000,
            );
            m.put_u32(a + mem + t * elem + s, 0x1000 * (t as u32 + 1));
        }
    }
    link(&mut m, &chain);
    let mut c = SnapshotCache::new(m);
    let l = lsmod(&mut c, &kernel(o), 0).unwrap();
    assert_eq!(l.len(), 2, "the unformed module is skipped");
    assert_eq!(l[0].name, "virtio");
    assert_eq!(l[0].refcount, 1);
    assert_eq!(l[0].size, 0x1000 * (1 + 2 + 3 + 4 + 5 + 6 + 7));
    assert_eq!(l[1].base, 0xffff_ffff_c110_0000);
    assert_eq!(l[1].state, "Live");
}

#[test]
fn cpus_find_current_through_gs() {
    let (mut c, k) = setup(true);
    let gs = 0xffff_8880_7fc0_0000u64;
    c.inner().put_u64(gs + 0x2_0000, HEAP + 4 * 0x1000);
    c.inner().cpus[0].msr_gs_base = gs;
    c.inner().cpus[1].cs_selector = 0x33;
    c.inner().cpus[1].msr_kernel_gs_base = gs;
    let v = cpus(&mut c, &k).unwrap();
    assert_eq!(
        (v[0].pid, v[0].comm.as_str(), v[0].user),
        (40, "pthreads", false)
    );
    assert_eq!((v[1].pid, v[1].user), (40, true));
}

#[test]
fn five_level_kernel_addresses_are_walked() {
    // With LA57 the direct map starts at 0xff11_0000_0000_0000, below the
    // 4-level kernel half: the walk must follow the paging mode.
    let (mut c, mut k) = setup(true);
    let moved = 0xff11_0000_0100_0000u64;
    let o = k.offsets.clone();
    let first = c.inner().read_exact(
        Space::Virt(AddressSpace::kernel_of(0)),
        INIT + o.task_tasks,
        8,
    );
    let first = u64::from_le_bytes(first.unwrap().try_into().unwrap());
    // Point init_task.tasks at a copy of the first leader's list node.
    let node = c
        .inner()
        .read_exact(Space::Virt(AddressSpace::kernel_of(0)), first, 16)
        .unwrap();
    c.inner().write_virt(moved, &node);
    c.inner().put_u64(INIT + o.task_tasks, moved);
    k.kernel_half = kernel_half(4);
    assert!(matches!(
        ps(&mut c, &k, 0, false),
        Err(LinuxError::BadList { .. })
    ));
    c.new_snapshot();
    k.kernel_half = kernel_half(5);
    // Now accepted (the copy's task fields are elsewhere: only the walk is
    // checked here).
    let r = ps(&mut c, &k, 0, false);
    assert!(!matches!(r, Err(LinuxError::BadList { .. })), "{r:?}");
}

/// Adds init_pid_ns's IDR over the tasks of `sample()` (two levels: a root
/// node of shift 6 over leaf nodes of shift 0) and the `struct pid`s.
fn add_idr(m: &mut FakeMemory, o: &mut Offsets, addrs: &[u64], tasks: &[FakeTask]) {
    let idr = crate::btf::PidIdr {
        ns_xa_head: 8,
        ns_idr_base: 0x10,
        node_shift: 0,
        node_slots: 0x28,
        pid_tasks: 0x8,
        task_pid_links: 0x1a0,
    };
    o.pid_idr = Some(idr);
    let node = |i: u64| HEAP + 0x30_0000 + i * 0x400;
    let root = node(0);
    m.write_virt(root + idr.node_shift, &[6]);
    m.put_u64(PID_NS + idr.ns_xa_head, root + 2);
    for (i, t) in tasks.iter().enumerate().skip(1) {
        let pid = u64::from(t.pid);
        let leaf = node(1 + pid / 64);
        m.put_u64(root + idr.node_slots + 8 * (pid / 64), leaf + 2);
        let sp = HEAP + 0x40_0000 + pid * 0x100;
        m.put_u64(leaf + idr.node_slots + 8 * (pid % 64), sp);
        m.put_u64(sp + idr.pid_tasks, addrs[i] + idr.task_pid_links);
    }
    // A sibling/retry entry and a value entry are skipped.
    m.put_u64(node(1) + idr.node_slots + 8 * 63, 0x102);
    m.put_u64(node(1) + idr.node_slots + 8 * 62, 0x7);
}

#[test]
fn ps_through_the_pid_idr_in_few_batches() {
    let (m, o) = with_idr();
    let mut c = SnapshotCache::new(m);
    let k = kernel(o);
    let all = ps_by_idr(&mut c, &k, 0, true).unwrap();
    let pids: Vec<u32> = all.iter().map(|t| t.pid).collect();
    assert_eq!(pids, [1, 2, 3, 40, 41, 42, 50, 60]);
    assert_eq!(all.iter().find(|t| t.pid == 50).unwrap().state, 'Z');
    let r = c.inner().stats().requests;
    assert!(
        r <= 7,
        "{r} batches: head, root, leaves, pids, tasks, parents+creds"
    );
    let procs = ps_by_idr(&mut c, &k, 0, false).unwrap();
    assert_eq!(procs.len(), 6);
}

#[test]
fn a_pid_idr_that_loops_ends_in_an_error() {
    let (mut m, o) = with_idr();
    let idr = o.pid_idr.unwrap();
    // The root points at itself: depth is bounded.
    let root = HEAP + 0x30_0000;
    m.put_u64(root + idr.node_slots, root + 2);
    let mut c = SnapshotCache::new(m);
    let e = ps_by_idr(&mut c, &kernel(o), 0, true).unwrap_err();
    assert!(matches!(e, LinuxError::BadList { .. }), "{e}");
}

#[test]
fn state_letters() {
    assert_eq!(state_letter(0, 0), 'R');
    assert_eq!(state_letter(1, 0), 'S');
    assert_eq!(state_letter(2, 0), 'D');
    assert_eq!(state_letter(0x402, 0), 'I');
    assert_eq!(state_letter(8, 0), 't');
    assert_eq!(state_letter(0, 0x10), 'X');
    assert_eq!(state_letter(0x40, 0), 'P');
}

#[test]
fn pstree_places_every_task_once() {
    let (mut c, k) = setup(true);
    let tasks = ps(&mut c, &k, 0, false).unwrap();
    let roots = pstree(&tasks);
    let lines: Vec<(usize, u32)> = roots
        .iter()
        .flat_map(|r| r.lines())
        .map(|(d, t)| (d, t.pid))
        .collect();
    // init(1) and kthreadd(2) are roots; 40 and 60 under 1, 50 under 40,
    // 3 under 2.
    assert_eq!(lines, [(0, 1), (1, 40), (2, 50), (1, 60), (0, 2), (1, 3)]);

    // A parent missing from the list, and a loop of ppids: nothing lost.
    let mut odd = tasks.clone();
    odd.iter_mut().find(|t| t.pid == 60).unwrap().ppid = 999;
    odd.iter_mut().find(|t| t.pid == 1).unwrap().ppid = 50;
    let roots = pstree(&odd);
    let mut seen: Vec<u32> = roots
        .iter()
        .flat_map(|r| r.lines())
        .map(|(_, t)| t.pid)
        .collect();
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 40, 50, 60]);
}

#[test]
fn pstree_of_a_very_long_ppid_chain_is_shallow() {
    let chain: Vec<Task> = (1..=20_000u32)
        .map(|pid| Task {
            pid,
            tgid: pid,
            ppid: pid - 1,
            uid: 0,
            gid: 0,
            state: 'S',
            comm: "sh".into(),
            kthread: false,
            has_mm: true,
            start_ns: 0,
            addr: u64::from(pid) * 0x1000,
        })
        .collect();
    let roots = pstree(&chain);
    let total: usize = roots.iter().map(|r| r.lines().len()).sum();
    assert_eq!(total, chain.len(), "nothing lost");
    assert!(
        roots
            .iter()
            .all(|r| r.lines().iter().all(|(d, _)| *d < MAX_TREE_DEPTH))
    );
    assert_eq!(roots.len(), 20_000usize.div_ceil(MAX_TREE_DEPTH));
    // Serializing and dropping do not recurse deeper than that.
    let json = serde_json::to_string(&roots).unwrap();
    assert!(json.len() > 100_000);
}

/// A CPU's current task that is on no list: hidden if alive, legitimate if
/// exiting (`release_task()` unlinks it before its last `schedule()`).
#[test]
fn a_current_task_off_the_lists_is_hidden_unless_exiting() {
    for exiting in [false, true] {
        let (mut m, o) = with_idr();
        let gone = HEAP + 0x60_0000;
        m.put_u32(gone + o.task_pid, 278);
        m.put_u32(gone + o.task_tgid, 278);
        m.write_virt(gone + o.task_comm, b"exe\0");
        m.put_u32(gone + o.task_flags, if exiting { PF_EXITING } else { 0 });
        let gs = 0xffff_8880_7fc0_0000u64;
        m.put_u64(gs + 0x2_0000, gone);
        m.cpus[0].msr_gs_base = gs;
        let mut c = SnapshotCache::new(m);
        let k = kernel(o);
        assert_eq!(cpus(&mut c, &k).unwrap()[0].exiting, exiting);
        let r = crate::checks::check_processes(&mut c, &k, 0).unwrap();
        let found: Vec<&str> = r.findings.iter().map(|f| f.found.as_str()).collect();
        if exiting {
            assert!(found.is_empty(), "{found:?}");
        } else {
            assert_eq!(
                found,
                [format!(
                    "task_struct at {gone:#x} only in cpu 0's current task"
                )]
            );
        }
    }
}

/// CPU 0's CFS run queue holds a listed task, a group whose own queue
/// holds a task on no list (hidden), and an exiting task on no list (on
/// its way out): only the hidden one is reported.
#[test]
fn a_queued_task_off_the_lists_is_hidden_unless_exiting() {
    let (mut m, mut o) = with_idr();
    let q = crate::btf::RunQueue {
        rq_timeline: 0x80,
        cfs_timeline: 0x40,
        se_run_node: 0x10,
        task_se: 0x300,
        se_my_q: Some(0x80),
        rb_right: 8,
        rb_left: 16,
    };
    o.run_queue = Some(q);
    let node = |task: u64| task + q.task_se + q.se_run_node;
    let listed = HEAP + 4 * 0x1000; // pid 40
    let hidden = HEAP + 0x60_0000;
    let exiting = HEAP + 0x61_0000;
    for (t, pid, flags) in [(hidden, 4242, 0), (exiting, 4343, PF_EXITING)] {
        m.put_u32(t + o.task_pid, pid);
        m.put_u32(t + o.task_tgid, pid);
        m.write_virt(t + o.task_comm, b"queued\0");
        m.put_u32(t + o.task_flags, flags);
    }
    // The group entity and its queue.
    let group = HEAP + 0x70_0000;
    let cfs = HEAP + 0x71_0000;
    m.put_u64(group + 0x80, cfs);
    m.put_u64(cfs + q.cfs_timeline, node(hidden));
    // CPU 0's tree: the listed task at the root, the group on the left,
    // the exiting task on the right.
    let gs = 0xffff_8880_7fc0_0000u64;
    m.cpus[0].msr_gs_base = gs;
    m.put_u64(gs + 0x2_0000, INIT);
    m.put_u64(gs + 0x3_0000 + q.rq_timeline, node(listed));
    m.put_u64(node(listed) + q.rb_left, group + q.se_run_node);
    m.put_u64(node(listed) + q.rb_right, node(exiting));
    let mut c = SnapshotCache::new(m);
    let k = kernel(o);
    let views = cpus(&mut c, &k).unwrap();
    let mut queued = runqueue_tasks(&mut c, &k, &views).unwrap();
    queued.sort();
    let mut want = vec![(0, listed), (0, hidden), (0, exiting)];
    want.sort();
    assert_eq!(queued, want);
    let r = crate::checks::check_processes(&mut c, &k, 0).unwrap();
    let found: Vec<(&str, &str)> = r
        .findings
        .iter()
        .map(|f| (f.what.as_str(), f.found.as_str()))
        .collect();
    assert_eq!(
        found,
        [(
            "pid 4242 (queued)",
            format!("task_struct at {hidden:#x} only in cpu 0's run queue (CFS)").as_str()
        )]
    );
}

/// A user process named like a kernel thread is reported; a usermode
/// helper (no PF_KTHREAD, no mm yet: `modprobe` before its exec, under its
/// kworker's name) is not.
#[test]
fn a_user_process_named_like_a_kernel_thread_but_not_a_usermode_helper() {
    let mut o = offsets(true);
    let mut m = FakeMemory::new(1);
    let mut tasks = sample();
    let user = |pid, comm| FakeTask {
        pid,
        tgid: pid,
        parent: 1,
        comm,
        state: 1,
        exit_state: 0,
        kthread: false,
        uid: 0,
    };
    tasks.push(user(70, "kworker/9:9"));
    tasks.push(user(71, "kworker/u4:1"));
    let addrs = lay_out(&mut m, &o, &tasks);
    add_idr(&mut m, &mut o, &addrs, &tasks);
    // pid 71 has not exec'd yet: no user address space.
    m.put_u64(addrs[tasks.len() - 1] + o.task_mm, 0);
    let mut c = SnapshotCache::new(m);
    let r = crate::checks::check_processes(&mut c, &kernel(o), 0).unwrap();
    let whats: Vec<&str> = r.findings.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(whats, ["pid 70 (kworker/9:9)"]);
}
