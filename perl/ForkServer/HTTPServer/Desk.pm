package ForkServer::HTTPServer::Desk;
use strict;
use warnings;

# The workers' desk: a worker in a request lists the connections it holds,
# and once that request has run for TAKE_AFTER while the worker sleeps in
# the app (a slow route waiting on something), or TAKE_RUNNING while it
# runs (a request that computes, or a worker the kernel has not run), a
# free sibling takes those on which a request waits (pidfd_getfd), and
# looks again every TAKE_AFTER while it runs. A request nginx sends on a
# kept connection of a busy worker then waits about TAKE_AFTER, not for the
# busy worker's request, however long; and a connection moves only when a
# request runs long, not at every request's start.
#
# One memory file (memfd) made by the workers' common ancestor: the roster
# (per worker index, its pid and its timer's descriptor), per index a
# record (see HEAD below) and one byte's POSIX record lock, held by the
# worker whenever it is not in a request: a sibling that gets it knows the
# worker is in the app, and the worker does not touch its connections
# until the sibling gives it back. Each worker's timer (a timerfd, armed
# for TAKE_AFTER when it starts a request and the timer has run out) wakes
# a free sibling, which holds a copy of it (pidfd_getfd) in its select().

use Config ();
use Errno qw(EINTR EAGAIN);
use Fcntl qw(F_SETLK F_SETLKW F_WRLCK F_UNLCK SEEK_SET);
use POSIX ();
use ForkServer::HTTPServer::Wire ();
use ForkServer::Process::Syscalls ();
use ForkServer::Process::Dumpable ();

use constant {
    # seconds a request runs before its worker's waiting connections may
    # go, the worker asleep in the app: a fast request's wait behind a slow
    # one (1 ms: within 3 times a proxied hello world's median)
    TAKE_AFTER   => 0.001,
    # the same, the worker running: a worker the kernel has not run for a
    # while serves what waits for it soon; moving its connections at once
    # costs more than the wait (they come back the other way)
    TAKE_RUNNING => 0.005,
    MAX_INDEX    => 256,         # worker indexes the roster holds (both generations)
    RECORD       => 4096,        # bytes per record: HEAD, then up to 1,000 connections
    RECORDS_AT   => 4096,        # the roster before them: MAX_INDEX * 8 bytes
    DESK_SIZE    => 4096 + 4096 * 256,    # RECORDS_AT + RECORD * MAX_INDEX
    LOCKS_AT     => 1 << 30,     # lock bytes, past every record (never written)
    TFD_NONBLOCK => 04000,
    TFD_CLOEXEC  => 02000000,
    CLOCK_MONOTONIC  => 1,
    PR_GET_DUMPABLE  => 3,
};

# A record: its head (HEAD bytes), then the worker's connections (i32
# each: descriptor * 2 + 1 for an idle kept one; -1 once a sibling took
# it). The head: when the request started (double, monotonic; 0 in its
# loop: a sibling reads it without the lock too, to know whether to take
# the lock at all), taken (u32: how many a sibling took), count (u32), the
# busy connection (i32), how many are excluded (u32), then up to
# MAX_EXCLUDED excluded ones (i32: bytes of theirs read already).
use constant { HEAD => 96, MAX_EXCLUDED => 16, AT_TAKEN => 8, AT_EXCLUDED => 24,
               HEAD_WRITE => 'd L L l L', HEAD_READ => 'd L L l L l16',
               NONE_TAKEN => "\0" x 4, NOT_STARTED => "\0" x 8 };

my %SYS = map { my $n = ForkServer::Process::Syscalls::number($_->[1]); defined $n ? ($_->[0] => $n) : () }
    [memfd => 'memfd_create'], [pidfd_open => 'pidfd_open'], [pidfd_getfd => 'pidfd_getfd'],
    [timerfd_create => 'timerfd_create'], [timerfd_settime => 'timerfd_settime'], [prctl => 'prctl'];

# struct flock as Linux lays it out on 64-bit systems (l_type, l_whence,
# l_start, l_len, l_pid): the desk is off elsewhere.
my $FLOCK = $^O eq 'linux' && $Config::Config{ivsize} == 8 && $Config::Config{longsize} == 8
    ? 's s x4 q q i x4' : undef;

my $MAP = eval { require File::Map; 1 };

sub _available { return $FLOCK && $MAP && keys(%SYS) == 6 }

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

# The desk is mapped into every worker (File::Map): reading and writing a
# record is a copy (substr), not a system call; the locks order them.
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
# its timer, its lock held, its roster entry written. $restore: the vassal
# dropped root, which made it not dumpable (ForkServer::Process::Dumpable).
sub join_desk {
    my ($desk, $index, $count, $restore) = @_;
    return undef unless $desk && _available() && $count <= MAX_INDEX && $index < $count;
    # Siblings may take its descriptors only while it is dumpable; one that
    # dropped root may be made so again (docs/security.md), its tracer for
    # Yama its master, whose descendants its siblings are.
    return undef unless syscall($SYS{prctl}, PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
        || $restore && ForkServer::Process::Dumpable::restore_unprivileged(getppid());
    my $tfd = syscall($SYS{timerfd_create}, CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return undef unless $tfd >= 0;
    # can this process take a descriptor at all (a filter may forbid it)?
    my $self_pidfd = syscall($SYS{pidfd_open}, $$ + 0, 0);
    my $probe = $self_pidfd >= 0 ? _getfd($self_pidfd, $tfd) : undef;
    POSIX::close($probe) if defined $probe;
    unless (defined $probe && _lock($desk, $index, F_WRLCK, 0)) {
        POSIX::close($_) for grep { $_ >= 0 } $tfd, $self_pidfd;
        return undef;
    }
    POSIX::close($self_pidfd);
    my $map;
    unless (eval { File::Map::map_handle($map, $desk, '+<', 0, DESK_SIZE); 1 }) {
        _lock($desk, $index, F_UNLCK, 0);
        POSIX::close($tfd);
        return undef;
    }
    my $seat = { desk => $desk, map => \$map, index => $index, count => $count, tfd => $tfd,
                 # this worker's own lock and unlock, packed once: every request takes them
                 own_lock   => pack($FLOCK, F_WRLCK, SEEK_SET, LOCKS_AT + $index, 1, 0),
                 own_unlock => pack($FLOCK, F_UNLCK, SEEK_SET, LOCKS_AT + $index, 1, 0),
                 record_at  => RECORDS_AT + RECORD * $index,
                 roster => '', siblings => {}, listed => undef, armed_until => 0,
                 timer_rin => '', timers => [], watch_at => 0 };
    # a record a worker before it in this index left (one that died in a
    # request) says nothing of this one
    substr($map, $seat->{record_at}, HEAD) = "\0" x HEAD;
    substr($map, 8 * $index, 8) = pack('l l', $$, $tfd);
    return $seat;
}

# Leaving: siblings forget this worker (its timer and its records).
sub leave_desk {
    my $seat = shift or return;
    substr(${ $seat->{map} }, 8 * $seat->{index}, 8) = pack('l l', 0, 0);
    return;
}

# The siblings' timers to watch in select(): $seat->{timer_rin} (their
# bits, to OR into select()'s read set) and $seat->{timers} ([index,
# descriptor], ...). The roster is read again at most ten times a second
# ($seat->{watch_at}: the next time); a sibling new in its index (a
# respawn, a reload's new generation) is opened once.
sub watch {
    my ($seat, $now) = @_;
    # a new sibling is rare
    $seat->{watch_at} = $now + 0.1;
    my $roster = substr(${ $seat->{map} }, 0, 8 * $seat->{count});
    return if $roster eq $seat->{roster};
    $seat->{roster} = $roster;
    my $sibs = $seat->{siblings};
    my @entries = unpack('l*', $roster);
    for my $i (0 .. $seat->{count} - 1) {
        my ($pid, $tfd) = @entries[2 * $i, 2 * $i + 1];
        next if $i == $seat->{index};
        my $old = $sibs->{$i};
        next if $old && $old->{pid} == $pid;
        if ($old) { POSIX::close($_) for grep { defined } @$old{qw(pidfd tfd)} }
        delete $sibs->{$i};
        next unless $pid > 0;
        my $pidfd = syscall($SYS{pidfd_open}, $pid, 0);
        next unless $pidfd >= 0;
        # the pid names our sibling still (the process is pinned by its pidfd
        # now; before, the number could have been a stranger's)
        unless (_ppid($pid) == getppid()) { POSIX::close($pidfd); next }
        my $copy = _getfd($pidfd, $tfd);
        unless (defined $copy) { POSIX::close($pidfd); next }
        # kept open: whether it runs is read at every look (two system
        # calls, not an open's six)
        my $stat;
        open($stat, "<", "/proc/$pid/stat") or undef $stat;
        $sibs->{$i} = { pid => $pid, pidfd => $pidfd, tfd => $copy, stat => $stat,
                        record_at => RECORDS_AT + RECORD * $i };
    }
    my $rin = '';
    vec($rin, $_->{tfd}, 1) = 1 for values %$sibs;
    $seat->{timer_rin} = $rin;
    $seat->{timers} = [map { [$_, $sibs->{$_}{tfd}] } sort { $a <=> $b } keys %$sibs];
    return;
}

sub _running {    # is the sibling running or runnable (not asleep)?
    my $sib = shift;
    my $fh = $sib->{stat} or return 0;
    sysseek($fh, 0, 0) or return 0;
    sysread($fh, my $stat, 512) or return 0;
    return $stat =~ /\)\s+R\s/ ? 1 : 0;
}

sub _ppid {
    my $pid = shift;
    open(my $fh, '<', "/proc/$pid/stat") or return -1;
    my $stat = <$fh> // '';
    return $stat =~ /\)\s+\S+\s+(\d+)/ ? $1 : -1;
}

# This worker starts a request on $busy_fd. Its connections ($list: [fd,
# idle], ...; written again only when $changed) may go from TAKE_AFTER on,
# those with a request waiting, to a free sibling, except the busy one and
# the @$excluded (undef: none). False when nothing may go. Every request
# pays for this: a few stores to the desk, one system call (the lock let
# go), and the timer's only once it has run out.
sub busy {
    my ($seat, $busy_fd, $list, $changed, $excluded) = @_;
    my $map = $seat->{map};
    my $at = $seat->{record_at};
    if ($changed) {
        substr($$map, $at + HEAD, 4 * @$list) = pack('l*', map { $_->[0] * 2 + ($_->[1] ? 1 : 0) } @$list);
    }
    if ($excluded) {
        return 0 if @$excluded > MAX_EXCLUDED;
        substr($$map, $at + AT_EXCLUDED, 4 * @$excluded) = pack('l*', @$excluded);
    }
    my $now = ForkServer::HTTPServer::Wire::now();
    # the whole head at once: a sibling reads it under the lock only (the
    # start alone, before, to know whether to take the lock at all); taken
    # is 0 while the worker holds its lock
    substr($$map, $at, AT_EXCLUDED) = pack(HEAD_WRITE, $now, 0, scalar @$list, $busy_fd,
                                           $excluded ? scalar @$excluded : 0);
    fcntl($seat->{desk}, F_SETLK, $seat->{own_unlock});
    # the timer is left to run out: armed again only once it has (a
    # sibling woken for a request that ended already finds this worker
    # back in its loop, and goes back to sleep)
    if ($now >= $seat->{armed_until}) {
        _arm($seat->{tfd}, TAKE_AFTER);
        $seat->{armed_until} = $now + TAKE_AFTER;
    }
    $seat->{listed} = $list;
    return 1;
}

# The request is done: the descriptors a sibling took meanwhile (this
# worker's copies are to be closed, unread), else ().
sub back {
    my $seat = shift;
    my $listed = delete $seat->{listed} or return ();
    # waits while a sibling is looking (microseconds)
    _fcntl_lock($seat->{desk}, $seat->{own_lock}, 1) unless fcntl($seat->{desk}, F_SETLKW, $seat->{own_lock});
    my $map = $seat->{map};
    my $at = $seat->{record_at};
    substr($$map, $at, 8) = NOT_STARTED;
    return () if substr($$map, $at + AT_TAKEN, 4) eq NONE_TAKEN;
    substr($$map, $at + AT_TAKEN, 4) = NONE_TAKEN;
    # the next busy() writes the whole list again
    my @entries = unpack('l*', substr($$map, $at + HEAD, 4 * @$listed));
    return map { $listed->[$_][0] } grep { $entries[$_] == -1 } 0 .. $#$listed;
}

# A sibling's timer went off. If its request has run TAKE_AFTER (asleep in
# the app) or TAKE_RUNNING (running), takes its listed connections with a
# request waiting (new descriptors, as [fd, idle]); the others stay, and
# the timer is armed again. () when it is back in its loop, or nothing was
# waiting. What it reads before the worker's lock is only a hint.
sub take_from {
    my ($seat, $i, $mine) = @_;
    my $sib = $seat->{siblings}{$i} or return ();
    my $ticks = '';
    return () unless sysread_fd($sib->{tfd}, \$ticks);
    my $map = $seat->{map};
    my $at = $sib->{record_at};
    my $started = unpack('d', substr($$map, $at, 8));
    return () unless $started > 0;    # in its loop: its next request arms the timer
    my $ran = ForkServer::HTTPServer::Wire::now() - $started;
    my $running = $ran >= TAKE_AFTER && _running($sib);
    my $left = ($running ? TAKE_RUNNING : TAKE_AFTER) - $ran;
    if ($left > 0) {    # a newer request than the timer's, or a running worker: look when it is due
        _arm($sib->{tfd}, $left);
        return ();
    }
    my $desk = $seat->{desk};
    return () unless _lock($desk, $i, F_WRLCK, 0);    # back in its loop
    # under the lock the worker stays in the request it is in; which one?
    if (unpack('d', substr($$map, $at, 8)) != $started) {    # a newer one
        _arm($sib->{tfd}, TAKE_AFTER);
        _lock($desk, $i, F_UNLCK, 0);
        return ();
    }
    my (undef, $taken, $n, $busy_fd, $nex, @excluded) = unpack(HEAD_READ, substr($$map, $at, HEAD));
    $nex = 0 if $nex > MAX_EXCLUDED;
    my %skip = map { $_ => 1 } $busy_fd, @excluded[0 .. $nex - 1];
    my @entries = $n ? unpack('l*', substr($$map, $at + HEAD, 4 * $n)) : ();
    my (%copy, $rin);
    $rin = '';
    for my $k (0 .. $#entries) {
        next if $entries[$k] < 0 || $skip{ $entries[$k] >> 1 };
        my $fd = _getfd($sib->{pidfd}, $entries[$k] >> 1) // next;
        $copy{$k} = $fd;
        vec($rin, $fd, 1) = 1;
    }
    my @got;
    if (%copy && select(my $rout = $rin, undef, undef, 0) > 0) {
        my @waiting = grep { vec($rout, $copy{$_}, 1) } sort { $a <=> $b } keys %copy;
        # A worker that is running (on a busy machine, one the kernel has
        # not given the processor for a while) rather than waiting in its
        # app will soon serve what waits for it: take enough to even out
        # the connections, one at least, not all (they would only pile up
        # here, and come back the other way the next time).
        if (@waiting > 1 && $running) {
            my $even = int(($n - ($mine // 0)) / 2);
            splice(@waiting, $even < 1 ? 1 : $even);
        }
        for my $k (@waiting) {
            push @got, [delete $copy{$k}, $entries[$k] & 1];
            $entries[$k] = -1;
        }
    }
    POSIX::close($_) for values %copy;
    if (@got) {
        substr($$map, $at + AT_TAKEN, 4) = pack('L', $taken + @got);
        substr($$map, $at + HEAD, 4 * @entries) = pack('l*', @entries);
    }
    _arm($sib->{tfd}, TAKE_AFTER) if %copy;    # some still listed: look again
    _lock($desk, $i, F_UNLCK, 0);
    return @got;
}

# Reads a timer's 8 bytes (clears it); false when it had not gone off.
sub sysread_fd {
    my ($fd, $buf) = @_;
    my $n;
    do { $n = POSIX::read($fd, $$buf, 8) } until defined $n || $! != EINTR;
    return ($n // 0) == 8;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Desk - a busy worker's idle connections, taken by a free sibling

=head1 DESCRIPTION

A worker of L<ForkServer::HTTPServer> that starts a request lists the idle
connections it holds (C<busy>); if the request runs for C<TAKE_AFTER>
(1 ms) with the worker asleep in the app, or C<TAKE_RUNNING> (5 ms) with
it running, the worker's timer wakes a free sibling, which takes them
(C<take_from>: C<pidfd_getfd>, under the worker's lock) and serves what
arrives on them; the worker, done (C<back>), closes its copies of those.
Linux 5.6 or later, 64-bit, File::Map, and a dumpable worker: one that
did not drop root, or one made dumpable again after the drop
(C<join_desk>'s C<$restore>: L<ForkServer::Process::Dumpable>); elsewhere
C<join_desk> returns undef.

=head1 FUNCTIONS

=head2 memory_file($name) -> $fh, open_desk() -> $fh

A memory file (C<memfd>, close-on-exec); the desk's, made before the
workers are forked. Undef where the system has none.

=head2 join_desk($fh, $index, $count, $restore) -> $seat

A worker's seat: its timer, its roster entry, its lock. Undef when the
system refuses a step (a seccomp filter, an old kernel), or when the
worker is not dumpable and may not be made so (C<$restore> false: its
vassal did not drop root, or holds a file it opened as root; or it still
holds a privilege).

=head2 leave_desk($seat), watch($seat, $now), busy($seat, $fd, $list, $changed, $excluded), back($seat) -> @fds_taken, take_from($seat, $index, $mine) -> ([$fd, $idle], ...)

The loop's calls: see the comments above each.

=cut
