use strict;
use warnings;
use Test::More;
use POSIX ();
use ForkServer::Base::Priority ();

# ForkServer::Base::Priority::raise in a child of its own each time (it
# changes the process it runs in): what it says, and what it leaves.
plan skip_all => 'x86_64 Linux only' unless $^O eq 'linux' && `uname -m` =~ /x86_64/;

# Runs $code in a forked child; returns what it printed.
sub in_child {
    my ($code) = @_;
    pipe my $r, my $w or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        my $out = eval { $code->() } // "died: $@";
        print {$w} $out;
        close $w;
        POSIX::_exit(0);
    }
    close $w;
    my $got = do { local $/; <$r> };
    waitpid $pid, 0;
    return $got;
}

is in_child(sub { ForkServer::Base::Priority::raise(0) . ' / nice ' . getpriority(0, 0) }),
    'priority: unchanged (fork-server-priority = 0) / nice 0', '0: nothing is done';

is in_child(sub { setpriority(0, 0, 5); ForkServer::Base::Priority::raise(10) . ' / nice ' . getpriority(0, 0) }),
    'priority: unchanged (started at nice 5, not 0) / nice 5',
    'a base started at another nice value is left there (its forks would be reset to 0)';

# without the right to raise a priority: as nobody when root
like in_child(sub {
    if ($> == 0) { POSIX::setgid(65534); POSIX::setuid(65534) or die "setuid: $!" }
    ForkServer::Base::Priority::raise(10) . ' / nice ' . getpriority(0, 0);
}), qr{^priority: unchanged \(nice -10: Permission denied\) / nice 0$}, 'not permitted: unchanged, and why';

SKIP: {
    skip 'raising a priority needs root', 2 unless $> == 0;
    my $got = in_child(sub {
        my $said = ForkServer::Base::Priority::raise(30);    # more than there is: the lowest nice value
        my $child = in_child(sub { 'child nice ' . getpriority(0, 0) });
        "$said / nice " . getpriority(0, 0) . " / $child";
    });
    like $got, qr{^priority: nice -20 \(not leading its session: its group unchanged\) / nice -20 / child nice 0$},
        'raised, and what it forks starts at nice 0; not its session leader: the group is not its own to change';
    my $groups = -e '/proc/self/autogroup'
              && (do { open my $fh, '<', '/proc/sys/kernel/sched_autogroup_enabled'; <$fh> } // 0) == 1;
    skip 'no session scheduling groups (autogroup)', 1 unless $groups;
    $got = in_child(sub {
        POSIX::setsid() > 0 or die "setsid: $!";
        my $said = ForkServer::Base::Priority::raise(10);
        my $child = in_child(sub { POSIX::setsid(); 'child group ' . _group_nice() });
        "$said / group " . _group_nice() . " / $child";
    });
    is $got, "priority: nice -10 (and its session's scheduling group) / group -10 / child group 0",
        "a session leader's group too; a forked process's new session is a new group at nice 0";
}

# A warm spare (ForkServer::Spares): the levels its base was raised by,
# its session's group and its worker raised, and both put back.
SKIP: {
    skip 'raising a priority needs root', 3 unless $> == 0;
    is in_child(sub {
        ForkServer::Base::Priority::raise(7);
        in_child(sub { 'forked: raised ' . ForkServer::Base::Priority::raised() . ', nice ' . getpriority(0, 0) });
    }), 'forked: raised 7, nice 0', 'what a raised base forks knows its levels, at nice 0';
    is in_child(sub {
        my $ok = ForkServer::Base::Priority::raise_process(10);
        my $was = getpriority(0, 0);
        my $child = in_child(sub { getpriority(0, 0) });
        ForkServer::Base::Priority::back($$);
        "$ok / nice $was, its child $child / back: nice " . getpriority(0, 0);
    }), '1 / nice -10, its child 0 / back: nice 0', 'a process raised and back (what it forks at nice 0)';
    my $groups = -e '/proc/self/autogroup'
              && (do { open my $fh, '<', '/proc/sys/kernel/sched_autogroup_enabled'; <$fh> } // 0) == 1;
    skip 'no session scheduling groups (autogroup)', 1 unless $groups;
    is in_child(sub {
        my $not_leader = ForkServer::Base::Priority::raise_group(10);
        POSIX::setsid() > 0 or die "setsid: $!";
        my $ok = ForkServer::Base::Priority::raise_group(10);
        my $was = _group_nice();
        ForkServer::Base::Priority::back(undef);
        "$not_leader / $ok, group $was / back: group " . _group_nice() . ', nice ' . getpriority(0, 0);
    }), '0 / 1, group -10 / back: group 0, nice 0', "only a session leader's group, and back";
}

sub _group_nice {
    open my $fh, '<', '/proc/self/autogroup' or return '?';
    my $line = <$fh> // '';
    return $line =~ /nice (-?\d+)/ ? $1 : '?';
}

done_testing;
