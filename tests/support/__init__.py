"""What the test suites share, and what the benchmarks may use too.

    lab             the kernel lab: peer namespace, cgroup, users, ausd, sessions
    lab_peer        the program the lab's peer runs (TCP and UDP echo)
    lab_client      the program ``lab.act`` runs: one network action
    lab_control     a control-socket client run as a test user: hostile
                    requests, held connections, followers, timed logins
    netns           network namespaces, veth pairs and addresses over netlink
                    (pyroute2), and setns for a child process
    cgroups         test cgroups under the cgroup2 root, never the root itself
    polling         wait_until: poll for a state with a deadline
    names           unique names for what tests make; free loopback ports
    postgres        a throwaway PostgreSQL server of its own
    server_process  `aus-server` run as a real process on loopback
    server_seed     rows written straight into aus-server's store
    bundle_server   a stand-in for aus-server's bundle endpoint

Imports point one way: test suites (tests/<suite>/) and bench/ import from
here; nothing here imports from bench/ or from a suite, and no suite
imports another suite's modules (tests/unit/test_support_imports.py).
"""
