package ForkServer::HTTPServer::Desk;
use strict;
use warnings;

# The workers' desk: a worker in a request lists the connections it holds,
# and once that request has run for TAKE_AFTER while the worker sleeps in
# the app (a slow route waiting on something), or computes (TAKE_AFTER of
# processor time in TAKE_RUNNING), a free sibling takes those on which a
# request waits (pidfd_getfd), and looks again every TAKE_AFTER while it
# runs. A request nginx sends on a kept connection of a busy worker then
# waits about TAKE_AFTER, not for the busy worker's request, however long;
# and a connection moves only when a request runs long, not at every
# request's start.
#
# One memory file (memfd) made by the workers' common ancestor, mapped by
# every worker (File::Map). What a request touches is on its first page:
# per worker index, whether it sleeps in select() (a byte), and its slot
# (a cache line: when its request started, 0 in its loop; the connection
# it serves; whether a sibling claimed it, and how many it took). Then the
# roster (per index, its pid and its timer's descriptor) and per index a
# record: the connections it holds, written when they change.
#
# A request costs its worker stores to that page and no system call: a
# sibling that looks claims the slot and makes every worker pass a memory
# barrier (membarrier) before it reads the start again, so either it sees
# the worker back in its loop, or the worker, back, sees the claim and
# waits for the sibling's lock (a POSIX record lock per index, held by a
# sibling while it looks) before it touches its connections: a lock with
# an asymmetric fence, whose fast side pays nothing. A sibling learns that
# a request runs long from its own select() timeout (the starts it reads
# before it sleeps), or, asleep since before the request started, from the
# worker's timer (a timerfd, armed for TAKE_AFTER only when a sibling
# sleeps long), of which it holds a copy (pidfd_getfd).

use Config ();
use Exporter 'import';
use Errno qw(EINTR EAGAIN EPERM);
use Fcntl qw(F_SETLK F_SETLKW F_WRLCK F_UNLCK SEEK_SET);
use POSIX ();
use Time::HiRes ();
use ForkServer::HTTPServer::Wire ();
use ForkServer::Process::Syscalls ();
use ForkServer::Process::Dumpable ();

use constant {
    # seconds a request runs before its worker's waiting connections may
    # go, the worker asleep in the app: a fast request's wait behind a slow
    # one (1 ms: within 3 times a proxied hello world's median)
    TAKE_AFTER   => 0.001,
    # a worker that runs is looked at this often, and gives some of its
    # waiting connections away when it had TAKE_AFTER of processor time
    # since the last look (a request that computes). One the kernel has not
    # run (a fast request waiting for a processor) serves them itself once
    # it runs: moving them costs both workers, and they come back.
    TAKE_RUNNING => 0.005,
    MAX_INDEX    => 256,         # worker indexes the desk holds (both generations)
    ASLEEP_AT    => 0,           # per index, a byte: 1 while it sleeps in select() longer than TAKE_AFTER
    SLOTS_AT     => 256,         # per index, a slot of SLOT bytes
    SLOT         => 64,          # a cache line each: a worker's stores do not disturb its siblings'
    ROSTER_AT    => 256 + 64 * 256,    # per index, its pid and its timer's descriptor (l l)
    RECORD       => 4096,        # bytes per record: HEAD, then up to 1,000 connections
    RECORDS_AT   => 20480,       # past the roster, on a page of its own
    DESK_SIZE    => 20480 + 4096 * 256,    # RECORDS_AT + RECORD * MAX_INDEX
    LOCKS_AT     => 1 << 30,     # lock bytes, past every record (never written)
    TFD_NONBLOCK => 04000,
    TFD_CLOEXEC  => 02000000,
    CLOCK_MONOTONIC  => 1,
    PR_GET_DUMPABLE  => 3,
    NEVER        => 9**9**9,
    MEMBARRIER_CMD_GLOBAL_EXPEDITED          => 2,
    MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED => 4,
};

# A slot: when the request started (double, monotonic; 0 in its loop),
# the connection it serves (i32), claimed (u32: 1 once a sibling started
# to look, until the worker, back, has seen what it took) and taken (u32:
# how many a sibling took); claimed and taken are written under the
# index's lock only. A record: how many connections (u32), how many are
# excluded (u32), up to MAX_EXCLUDED excluded ones (i32: bytes of theirs
# read already), then at HEAD the connections (i32 each: descriptor * 2 +
# 1 for an idle kept one; -1 once a sibling took it).
use constant { AT_BUSY => 8, AT_CLAIMED => 12, AT_TAKEN => 16,
               HEAD => 96, MAX_EXCLUDED => 16, AT_NEX => 4, AT_EXCLUDED => 8,
               NOT_CLAIMED => "\0" x 4, CLAIMED => pack('L', 1), NOT_STARTED => "\0" x 8 };

our %SYS = map { my $n = ForkServer::Process::Syscalls::number($_->[1]); defined $n ? ($_->[0] => $n) : () }
    [memfd => 'memfd_create'], [pidfd_open => 'pidfd_open'], [pidfd_getfd => 'pidfd_getfd'],
    [timerfd_create => 'timerfd_create'], [timerfd_settime => 'timerfd_settime'], [prctl => 'prctl'],
    [membarrier => 'membarrier'];
my $SYS_PREAD = ForkServer::Process::Syscalls::number('pread64');

# struct flock as Linux lays it out on 64-bit systems (l_type, l_whence,
# l_start, l_len, l_pid): the desk is off elsewhere.
my $FLOCK = $^O eq 'linux' && $Config::Config{ivsize} == 8 && $Config::Config{longsize} == 8
    ? 's s x4 q q i x4' : undef;

my $MAP = eval { require File::Map; 1 };

# for the sibling's side (ForkServer::HTTPServer::DeskLook)
our @EXPORT_OK = (qw(%SYS _lock _getfd TAKE_AFTER TAKE_RUNNING SLOTS_AT SLOT ROSTER_AT RECORD RECORDS_AT NEVER MEMBARRIER_CMD_GLOBAL_EXPEDITED AT_CLAIMED AT_TAKEN HEAD MAX_EXCLUDED CLAIMED NOT_STARTED));

sub _available { return $FLOCK && $MAP && keys(%SYS) == 7 }

# The memory file (close-on-exec), or undef where the system has no desk.
sub open_desk {
    return undef unless _available();
    my $fh = memory_file('psgi-forkserver-desk') or return undef;
    # sparse: a page is memory once written
    return truncate($fh, DESK_SIZE) ? $fh : undef;
}

# A memory file (memfd, close-on-exec) named $name, or undef where the
# system has none.
sub memory_file {
    my $name = shift;    # copied: syscall() takes a writable buffer
    return undef unless $SYS{memfd};
    my $fd = syscall($SYS{memfd}, $name, 1);
    return undef unless $fd >= 0 && open(my $fh, '+<&=', $fd);
    return $fh;
}

# Index $index's lock: held by a sibling while it looks at the worker's
# slot and record; the worker waits for it only when it finds its slot
# claimed.
sub _lock {
    my ($fh, $index, $type, $wait) = @_;
    my $flock = pack($FLOCK, $type, SEEK_SET, LOCKS_AT + $index, 1, 0);
    return _fcntl_lock($fh, $flock, $wait);
}

sub _fcntl_lock {
    my ($fh, $flock, $wait) = @_;
    while (1) {
        return 1 if fcntl($fh, $wait ? F_SETLKW : F_SETLK, $flock);
        return 0 unless $wait && $! == EINTR;
    }
}

# itimerspec: no interval, $seconds from now (0: disarmed).
sub _arm {
    my ($tfd, $seconds) = @_;
    my $sec = int $seconds;
    my $spec = pack('q4', 0, 0, $sec, int(($seconds - $sec) * 1e9));
    syscall($SYS{timerfd_settime}, $tfd, 0, $spec, 0);
}

sub _getfd {
    my ($pidfd, $fd) = @_;
    my $got = syscall($SYS{pidfd_getfd}, $pidfd, $fd, 0);
    return $got >= 0 ? $got : undef;
}

# A worker's seat at the desk (index: its byte of the roster, of $count in
# use), or undef when the system cannot let siblings take connections:
# its timer, its roster entry written. $restore: the vassal dropped root,
# which made it not dumpable (ForkServer::Process::Dumpable).
sub join_desk {
    my ($desk, $index, $count, $restore) = @_;
    return undef unless $desk && _available() && $count <= MAX_INDEX && $index < $count;
    # An index is one worker's at a time. Reloads in quick succession give
    # a new generation the indexes of the one before the last, which may
    # still be winding down with its seat (in a long request): its slot,
    # record and descriptor numbers are not this worker's. 'held': join
    # again later (Conns::_seat), once it left.
    return (undef, 'held') if _held($desk, $index);
    # Siblings may take its descriptors only while it is dumpable; one that
    # dropped root may be made so again (docs/security.md), its tracer for
    # Yama its master, whose descendants its siblings are.
    return undef unless syscall($SYS{prctl}, PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
        || $restore && ForkServer::Process::Dumpable::restore_unprivileged(getppid());
    # a sibling's barrier reaches this process only once it asked for them
    return undef unless syscall($SYS{membarrier}, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0;
    my $tfd = syscall($SYS{timerfd_create}, CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return undef unless $tfd >= 0;
    # can this process take a descriptor at all (a filter may forbid it)?
    my $self_pidfd = syscall($SYS{pidfd_open}, $$ + 0, 0);
    my $probe = $self_pidfd >= 0 ? _getfd($self_pidfd, $tfd) : undef;
    POSIX::close($probe) if defined $probe;
    POSIX::close($self_pidfd) if $self_pidfd >= 0;
    my $map;
    unless (defined $probe && eval { File::Map::map_handle($map, $desk, '+<', 0, DESK_SIZE); 1 }) {
        POSIX::close($tfd);
        return undef;
    }
    my $slot_at = SLOTS_AT + SLOT * $index;
    my $seat = { desk => $desk, map => \$map, index => $index, count => $count, tfd => $tfd,
                 # this worker's lock, packed once: taken when it finds its slot claimed
                 own_lock   => pack($FLOCK, F_WRLCK, SEEK_SET, LOCKS_AT + $index, 1, 0),
                 own_unlock => pack($FLOCK, F_UNLCK, SEEK_SET, LOCKS_AT + $index, 1, 0),
                 slot_at    => $slot_at,
                 busy_at    => $slot_at + AT_BUSY,
                 claimed_at => $slot_at + AT_CLAIMED,
                 asleep_at  => ASLEEP_AT + $index,
                 record_at  => RECORDS_AT + RECORD * $index,
                 roster => '', siblings => {}, sibs => [], listed => undef, excluding => 0,
                 armed_until => 0, asleep => 0, next_due => 0,
                 timer_rin => '', timers => [], watch_at => 0 };
    # what a worker before it in this index left (one that died in a
    # request) says nothing of this one
    substr($map, $slot_at, SLOT) = "\0" x SLOT;
    substr($map, $seat->{asleep_at}, 1) = "\0";
    substr($map, ROSTER_AT + 8 * $index, 8) = pack('l l', $$, $tfd);
    return $seat;
}

# Is index $index in the roster of a living process other than this one?
sub _held {
    my ($desk, $index) = @_;
    return 0 unless $SYS_PREAD;
    my $entry = "\0" x 4;    # syscall() takes a writable buffer
    # pread: the memory file's offset is shared with every worker
    return 0 unless syscall($SYS_PREAD, fileno($desk), $entry, 4, ROSTER_AT + 8 * $index) == 4;
    my $pid = unpack('l', $entry);
    return $pid > 0 && $pid != $$ && (kill(0, $pid) || $!{EPERM}) ? 1 : 0;
}

# Leaving: siblings forget this worker (its timer and its records). Its
# successor in the index (a leaving worker is replaced at once) is left
# as it is.
sub leave_desk {
    my $seat = shift or return;
    my $roster_at = ROSTER_AT + 8 * $seat->{index};
    return unless unpack('l', substr(${ $seat->{map} }, $roster_at, 4)) == $$;
    substr(${ $seat->{map} }, $seat->{asleep_at}, 1) = "\0";
    substr(${ $seat->{map} }, $roster_at, 8) = pack('l l', 0, 0);
    return;
}

# The connections this worker holds ($list: [fd, idle], ...), which may go
# from TAKE_AFTER on, those with a request waiting, to a free sibling,
# except the busy one and the @$excluded (bytes of theirs read already).
# Written when they change (a connection came, went or holds bytes), not at
# every request. False when they may not go (too many excluded).
sub list {
    my ($seat, $list, $excluded) = @_;
    my $map = $seat->{map};
    my $at = $seat->{record_at};
    my $nex = $excluded ? @$excluded : 0;
    return 0 if $nex > MAX_EXCLUDED;
    substr($$map, $at + HEAD, 4 * @$list) = pack('l*', map { $_->[0] * 2 + ($_->[1] ? 1 : 0) } @$list)
        if $list != ($seat->{listed} // 0);
    substr($$map, $at + AT_EXCLUDED, 4 * $nex) = pack('l*', @$excluded) if $nex;
    substr($$map, $at, 8) = pack('L L', scalar @$list, $nex);
    $seat->{listed} = $list;
    $seat->{excluding} = $nex;
    return 1;
}

# This worker starts a request on $busy_fd, its connections listed
# (list()). Every request pays for this: two stores to the desk, and, when
# a sibling sleeps long, its timer armed once it has run out.
sub busy {
    my ($seat, $busy_fd) = @_;
    my $map = $seat->{map};
    substr($$map, $seat->{busy_at}, 4) = pack('l', $busy_fd);
    my $now = Time::HiRes::clock_gettime(CLOCK_MONOTONIC);    # Wire::now(), without a call
    # the start last: a sibling reads the rest only for a start it saw
    substr($$map, $seat->{slot_at}, 8) = pack('d', $now);
    # a sibling asleep since before this start does not know of it: the
    # timer wakes it when the request is due a look (left to run out, and
    # armed again only once it has: a sibling woken for a request that
    # ended finds this worker back in its loop, and goes back to sleep)
    if ($now >= $seat->{armed_until} && index(substr($$map, ASLEEP_AT, $seat->{count}), "\1") >= 0) {
        _arm($seat->{tfd}, TAKE_AFTER);
        $seat->{armed_until} = $now + TAKE_AFTER;
    }
    return 1;
}

# The request is done: the descriptors a sibling took meanwhile (this
# worker's copies are to be closed, unread; a connection that goes makes
# the list change), else ().
sub back {
    my $seat = shift;
    my $map = $seat->{map};
    substr($$map, $seat->{slot_at}, 8) = NOT_STARTED;
    # not claimed: no sibling looked at this request (take_from's barrier)
    return () if substr($$map, $seat->{claimed_at}, 4) eq NOT_CLAIMED;
    # waits while a sibling is looking (microseconds)
    _fcntl_lock($seat->{desk}, $seat->{own_lock}, 1);
    my $taken = unpack('L', substr($$map, $seat->{slot_at} + AT_TAKEN, 4));
    substr($$map, $seat->{claimed_at}, 8) = NOT_CLAIMED . NOT_CLAIMED;    # claimed and taken
    my $listed = $seat->{listed};
    my @entries = $taken ? unpack('l*', substr($$map, $seat->{record_at} + HEAD, 4 * @$listed)) : ();
    _fcntl_lock($seat->{desk}, $seat->{own_unlock}, 0);
    return () unless $taken;
    return map { $listed->[$_][0] } grep { $entries[$_] == -1 } 0 .. $#$listed;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Desk - a busy worker's idle connections, taken by a free sibling

=head1 DESCRIPTION

A worker of L<ForkServer::HTTPServer> that starts a request says so on the
desk (C<busy>: its start and the connection it serves, stores to shared
memory; the connections it holds are listed when they change, C<list>);
if the request runs for C<TAKE_AFTER> (1 ms) with the worker asleep in the
app, or computes (1 ms of processor time in C<TAKE_RUNNING>, 5 ms), a
free sibling, woken by its own C<select()> timeout (C<sleeping>, C<due>)
or by the worker's timer when it slept since before the start, takes
those with a request waiting (C<take_from>: C<pidfd_getfd>, after a
C<membarrier> that makes the worker see its claim) and serves them; the
worker, done (C<back>), closes its copies of those, having waited for
the sibling's lock only when it was claimed. Linux 5.6 or later, 64-bit,
File::Map, C<membarrier>'s global expedited barrier, and a dumpable
worker: one that did not drop root, or one made dumpable again after the
drop (C<join_desk>'s C<$restore>: L<ForkServer::Process::Dumpable>);
elsewhere C<join_desk> returns undef.

=head1 FUNCTIONS

=head2 memory_file($name) -> $fh, open_desk() -> $fh

A memory file (C<memfd>, close-on-exec); the desk's, made before the
workers are forked. Undef where the system has none.

=head2 join_desk($fh, $index, $count, $restore) -> $seat

A worker's seat: its timer, its roster entry, its slot. Undef when the
system refuses a step (a seccomp filter, an old kernel), or when the
worker is not dumpable and may not be made so (C<$restore> false: its
vassal did not drop root, or holds a file it opened as root; or it still
holds a privilege). C<(undef, 'held')> while another living process
holds C<$index> in the roster (a worker of the generation before the
last, winding down in a request): the caller asks again later.

=head2 leave_desk($seat), watch($seat, $now), sleeping($seat, $now, $timeout) -> $timeout, due($seat, $rout, $now) -> @indexes, list($seat, $list, $excluded), busy($seat, $fd), back($seat) -> @fds_taken, take_from($seat, $index, $mine) -> ([$fd, $idle], ...)

The loop's calls: see the comments above each.

=cut
