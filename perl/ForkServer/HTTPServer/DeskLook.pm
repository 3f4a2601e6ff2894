package ForkServer::HTTPServer::DeskLook;
use strict;
use warnings;

# The workers' desk (ForkServer::HTTPServer::Desk), as a free sibling sees
# it: the siblings it watches, when it wakes to look at their requests,
# and the look itself, which takes a busy worker's waiting connections.

use Errno qw(EINTR);
use Fcntl qw(F_WRLCK F_UNLCK);
use POSIX ();
use ForkServer::HTTPServer::Wire ();
use ForkServer::HTTPServer::Desk qw(%SYS _lock _getfd TAKE_AFTER TAKE_RUNNING SLOTS_AT SLOT ROSTER_AT RECORD RECORDS_AT NEVER MEMBARRIER_CMD_GLOBAL_EXPEDITED AT_CLAIMED AT_TAKEN HEAD MAX_EXCLUDED CLAIMED NOT_STARTED);

# The siblings' timers to watch in select(): $seat->{timer_rin} (their
# bits, to OR into select()'s read set) and $seat->{timers} ([index,
# descriptor], ...). The roster is read again at most ten times a second
# ($seat->{watch_at}: the next time); a sibling new in its index (a
# respawn, a reload's new generation) is opened once.
sub watch {
    my ($seat, $now) = @_;
    # a new sibling is rare
    $seat->{watch_at} = $now + 0.1;
    my $roster = substr(${ $seat->{map} }, ROSTER_AT, 8 * $seat->{count});
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
        # kept open: whether it runs, and how long it ran, are read at a
        # look (two system calls each, not an open's six)
        my ($stat, $sched);
        open($stat, '<', "/proc/$pid/stat") or undef $stat;
        open($sched, '<', "/proc/$pid/schedstat") or undef $sched;
        $sibs->{$i} = { pid => $pid, pidfd => $pidfd, tfd => $copy, stat => $stat, sched => $sched,
                        index => $i, slot_at => SLOTS_AT + SLOT * $i, record_at => RECORDS_AT + RECORD * $i,
                        # the next look at the request that started at look_for (its bytes)
                        look_for => NOT_STARTED, look_at => 0,
                        # its processor time (ns) at the last look at the request started at cpu_for
                        cpu_for => NOT_STARTED, cpu => 0 };
    }
    my $rin = '';
    vec($rin, $_->{tfd}, 1) = 1 for values %$sibs;
    $seat->{timer_rin} = $rin;
    $seat->{timers} = [map { [$_, $sibs->{$_}{tfd}] } sort { $a <=> $b } keys %$sibs];
    $seat->{sibs} = [map { $sibs->{ $_->[0] } } @{ $seat->{timers} }];
    return;
}

sub _running {    # is the sibling running or runnable (not asleep)?
    my $sib = shift;
    my $fh = $sib->{stat} or return 0;
    sysseek($fh, 0, 0) or return 0;
    sysread($fh, my $stat, 512) or return 0;
    return $stat =~ /\)\s+R\s/ ? 1 : 0;
}

sub _cpu_ns {    # the sibling's time on a processor so far (ns), or undef
    my $sib = shift;
    my $fh = $sib->{sched} or return undef;
    sysseek($fh, 0, 0) or return undef;
    sysread($fh, my $sched, 128) or return undef;
    return $sched =~ /^(\d+)/ ? $1 : undef;
}

sub _ppid {
    my $pid = shift;
    open(my $fh, '<', "/proc/$pid/stat") or return -1;
    my $stat = <$fh> // '';
    return $stat =~ /\)\s+\S+\s+(\d+)/ ? $1 : -1;
}

# This worker goes to sleep in select() for at most $timeout seconds: it
# says so on the desk (a sibling that starts a request then arms its timer
# to wake it), and wakes by itself when a sibling's request it sees is due
# a look. The timeout to sleep for.
sub sleeping {
    my ($seat, $now, $timeout) = @_;
    my $map = $seat->{map};
    # said first, the starts read after: a sibling that starts a request
    # now either is seen here or sees this worker asleep
    substr($$map, $seat->{asleep_at}, 1) = "\1";
    $seat->{asleep} = 1;
    # when each sibling's request is next due a look: TAKE_AFTER after its
    # start, or when the last look said (look_at, for the start look_for)
    my $next = NEVER;
    for my $sib (@{ $seat->{sibs} }) {
        my $start = substr($$map, $sib->{slot_at}, 8);
        next if $start eq NOT_STARTED;
        my $due = $start eq $sib->{look_for} ? $sib->{look_at} : unpack('d', $start) + TAKE_AFTER;
        $next = $due if $due < $next;
    }
    $seat->{next_due} = $next;
    return $timeout if $next - $now >= $timeout;
    # awake within TAKE_AFTER, it sees any request that starts from now
    # in time: no sibling need arm its timer for it
    substr($$map, $seat->{asleep_at}, 1) = "\0" if $next - $now <= TAKE_AFTER;
    return $next > $now ? $next - $now : 0;
}

# Back from select(): the siblings whose requests are due a look
# (indexes), their timers read.
sub due {
    my ($seat, $rout, $now) = @_;
    my $map = $seat->{map};
    if ($seat->{asleep}) {
        substr($$map, $seat->{asleep_at}, 1) = "\0";
        $seat->{asleep} = 0;
    }
    my $fired;
    if (defined $rout) {
        for (@{ $seat->{timers} }) {
            next unless vec($rout, $_->[1], 1);
            sysread_fd($_->[1], \my $ticks);
            $fired = 1;
        }
    }
    # what sleeping() saw holds for this round only: a request that
    # started since is not due yet, or its timer went off
    my $next = $seat->{next_due};
    $seat->{next_due} = 0;
    return () if $now < $next && !$fired;
    my @due;
    for my $sib (@{ $seat->{sibs} }) {
        my $start = substr($$map, $sib->{slot_at}, 8);
        next if $start eq NOT_STARTED;
        my $due = $start eq $sib->{look_for} ? $sib->{look_at} : unpack('d', $start) + TAKE_AFTER;
        push @due, $sib->{index} if $due <= $now;
    }
    return @due;
}

# Sibling $i's request is due a look (due()). If it has run TAKE_AFTER
# asleep in the app, or computes, takes its listed connections with a
# request waiting (new descriptors, as [fd, idle]); the others stay, to
# be looked at again TAKE_AFTER later. () when it is back in its loop, or
# nothing was waiting. What it reads before the barrier is only a hint.
sub take_from {
    my ($seat, $i, $mine) = @_;
    my $sib = $seat->{siblings}{$i} or return ();
    my $map = $seat->{map};
    my $slot_at = $sib->{slot_at};
    my $start = substr($$map, $slot_at, 8);
    return () if $start eq NOT_STARTED;    # in its loop: its next request says so
    my $now = ForkServer::HTTPServer::Wire::now();
    my $ran = $now - unpack('d', $start);
    my $running = $ran >= TAKE_AFTER && _running($sib);
    my $left = TAKE_AFTER - $ran;
    if ($running) {
        # running, or waiting for a processor: only one that computes (it
        # had TAKE_AFTER of processor time since the last look) gives some
        my $cpu = _cpu_ns($sib);
        if ($sib->{cpu_for} ne $start || (defined $cpu && $cpu - $sib->{cpu} < TAKE_AFTER * 1e9)) {
            @$sib{qw(cpu_for cpu)} = ($start, $cpu // 0);
            $left = TAKE_RUNNING;
        }
    }
    @$sib{qw(look_for look_at)} = ($start, $now + $left);
    return () if $left > 0;    # looked at again when it is due
    $sib->{look_at} = NEVER;    # nothing listed: no more looks at this request
    my $desk = $seat->{desk};
    return () unless _lock($desk, $i, F_WRLCK, 0);    # another sibling is looking
    # Claimed, then every worker's memory accesses put in order, then the
    # start read again: the same start means that the worker, back from
    # it, will find the claim and wait for this lock; any other, that it
    # is back already (its connections are its own again) or in a newer
    # request, which this look knows nothing of.
    substr($$map, $slot_at + AT_CLAIMED, 4) = CLAIMED;
    syscall($SYS{membarrier}, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0);
    # and the index still this sibling's: a worker that left is replaced
    # in it at once, and its successor's descriptor numbers name others in
    # the process this look knows by that index until watch() reads the
    # roster again
    if (substr($$map, $slot_at, 8) ne $start
        || unpack('l', substr($$map, ROSTER_AT + 8 * $i, 4)) != $sib->{pid}) {
        $seat->{watch_at} = 0;
        # the claim stays: the worker may have seen it already and be waiting
        $sib->{look_for} = NOT_STARTED;
        _lock($desk, $i, F_UNLCK, 0);
        return ();
    }
    my (undef, $busy_fd, undef, $taken) = unpack('d l L L', substr($$map, $slot_at, 20));
    my $at = $sib->{record_at};
    my ($n, $nex, @excluded) = unpack('L L l16', substr($$map, $at, HEAD));
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
        # One that computes will still serve what waits for it: take
        # enough to even out the connections, one at least, not all (they
        # would only pile up here, and come back the other way).
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
        substr($$map, $slot_at + AT_TAKEN, 4) = pack('L', $taken + @got);
        substr($$map, $at + HEAD, 4 * @entries) = pack('l*', @entries);
    }
    $sib->{look_at} = ForkServer::HTTPServer::Wire::now() + TAKE_AFTER if %copy;    # some still listed: look again
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

ForkServer::HTTPServer::DeskLook - a free worker's looks at its busy siblings on the desk

=head1 FUNCTIONS

=head2 watch($seat, $now), sleeping($seat, $now, $timeout) -> $timeout, due($seat, $rout, $now) -> @indexes, take_from($seat, $index, $mine) -> ([$fd, $idle], ...)

The loop's calls: see the comments above each, and
L<ForkServer::HTTPServer::Desk>.

=cut
