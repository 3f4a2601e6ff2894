package ForkServer::HTTPServer::Solo;
use strict;
use warnings;

# `master = false`: the vassal's one process serves its connections itself,
# with no worker forked. Forking the worker was some 40 % of a vassal's
# start-up (a second copy of the page tables); without it, what the master
# did for its workers is done here, in the same loop as the connections:
# the Emperor pipe (its bytes and its end of file), heartbeat, idle,
# harakiri's backstop, and max-requests, which asks the Emperor for a new
# process instead of forking one.

use Errno qw(EINTR EAGAIN);
use IO::Handle ();
use POSIX ();
use Time::HiRes ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Process::Exit ();
use ForkServer::Process::KillTimer ();
use ForkServer::Process::Session ();
use ForkServer::Protocol qw(:vassal_bytes :emperor_bytes);
use ForkServer::HTTPServer::Conns ();
use ForkServer::HTTPServer::Listener ();
use ForkServer::HTTPServer::Wire qw(now);
use ForkServer::HTTPServer::Worker qw(:msg);

# Harakiri's backstop, where no master can SIGKILL a process whose Perl
# handler cannot run (stuck inside one XS call, or with SIGALRM blocked):
# a timer of the process's own sends it SIGKILL one second after the
# alarm. Where that timer cannot be had, the alarm's disposition goes back
# to the kernel's default once it has fired (SA_RESETHAND) and it fires
# again a second later, which SIGALRM's default action ends.
use constant HARAKIRI_BACKSTOP => 1;
use constant SETTLE_AFTER => 1;

sub run_solo {
    my $self = shift;
    ForkServer::HTTPServer::Listener::setup($self);
    # the Emperor pipe and the config pipe are this process's own: kept
    # away from the worker set-up, which closes them
    my $solo = $self->{solo_state} = {
        emperor   => delete $self->{emperor_fh},
        config_fh => delete $self->{config_fh},
        last_activity => now(),
        idle_sent => 0,
        next_heartbeat => undef,
        replacement_asked => 0,
        stop_heard => 0,
        # once, after the first request or SETTLE_AFTER seconds: what its
        # start needed and the rest of its life does not (a warm spare's
        # priority: ForkServer::Spares::Solo)
        settle => delete $self->{settle},
        settle_at => now() + SETTLE_AFTER,
    };
    my $messages = \do { no warnings 'once'; local *SOLO_MESSAGES };
    tie *$messages, 'ForkServer::HTTPServer::Solo::Messages', $self;
    $self->{ready_r} = $self->{ready_w} = $messages;
    $self->{master_pid} = getppid();
    $self->{gen} = 1;
    # no memory shared with workers: the process writes its requests slot
    # to the file itself
    delete $self->{requests_mem};
    $self->_open_requests_file;
    unless ($solo->{emperor}) {
        # a stop pipe nobody closes: the loop's stop descriptor when no
        # Emperor pipe stands in for it
        pipe(my $r, my $w) or die "pipe: $!";
        @$self{qw(stop_r stop_w)} = ($r, $w);
    }
    $self->{sigmask} = POSIX::SigSet->new;
    $self->_worker_setup(1);
    $0 = $self->{proctitle} if length $self->{proctitle};
    # SIGHUP: a reload, which for one process is a new one (the master's
    # reload forks new workers from the app in memory; here the Emperor
    # adopts a new process, which opens the access log again too)
    my $hup = 0;
    local $SIG{HUP} = sub { $hup = 1 };
    $self->{server_ready}->({
        host => $self->{server_name}, port => $self->{server_port},
        server_software => 'ForkServer',
    }) if $self->{server_ready};
    ForkServer::Process::Exit::mark_base() unless ForkServer::Process::Exit::marked();

    my $listen = $self->{listen_sock};
    IO::Handle::blocking($listen, 0);
    my $efd = $solo->{emperor} ? fileno $solo->{emperor} : undef;
    my $loop = {
        conns => {}, pending => {}, buffered => {}, leaving => 0, stop_seen_at => undef,
        lfd => fileno $listen,
        stop_fd => $efd // fileno $self->{stop_r},
        stimeo => pack('l!l!', $self->{socket_timeout}, 0),
        handoff => undef,
    };
    # accepting, and every worker (this one) accepts
    ForkServer::Vassal::EmperorPipe->send($solo->{emperor}, ACCEPTING);
    ForkServer::Vassal::EmperorPipe->send($solo->{emperor}, LOYAL);
    $self->{solo_loop} = $loop;
    my $wait_until;
    while (1) {
        my $now = now();
        if ($hup) {
            $hup = 0;
            # without an Emperor to start the next process: the access log
            # is opened again (a rotation) and this one goes on
            if ($solo->{emperor}) { $self->_solo_replace($loop, 'reload') }
            elsif (defined $self->{access_log_path}) { $self->_reopen_access_log }
        }
        if (!$self->_wind_down($loop, $now)) {
            # A process that asked for its replacement stays until the
            # Emperor stops it (its successor accepts first), or `mercy`
            # seconds if no Emperor answers; a stop (byte 2, end of file,
            # SIGTERM) ends the wait.
            last unless $solo->{replacement_asked} && !${ $self->{stopping_ref} } && $solo->{emperor};
            $wait_until //= $solo->{answer_due};
            last if $now >= $wait_until;
        }
        my ($rin, $timeout);
        if (defined $wait_until) {    # no connection left: the Emperor pipe alone
            ($rin, $timeout) = ('', $wait_until - $now);
        } else {
            ($rin, $timeout) = $self->_select_set($loop, $now);
        }
        vec($rin, $efd, 1) = 1 if defined $efd && !$solo->{stop_heard};
        $timeout = $self->_solo_timers($now, $timeout);
        $timeout = 0 if $timeout < 0;
        # a request counted: the first one is served
        $self->_solo_settle if $solo->{settle} && $self->{requests_dirty};
        $self->_flush_requests if $self->{requests_dirty};
        my $n = select(my $rout = $rin, undef, undef, $timeout);
        if ($n < 0) {
            next if $! == EINTR;
            die "select: $!\n";
        }
        if ($n > 0 && defined $efd && vec($rout, $efd, 1)) {
            vec($rout, $efd, 1) = 0;
            $self->_solo_read_emperor($loop);
        }
        my $ready = $self->_ready_conns($loop, $n > 0 ? $rout : undef);
        $loop->{ready} = $ready;
        $self->_serve_conn($loop, $_) for sort { $a <=> $b } keys %$ready;
    }
    $self->_flush_requests if $self->{requests_dirty};
    unlink $self->{requests_file} if $self->{requests_file};
    $self->_end_session if $solo->{emperor_vanished};
    ForkServer::HTTPServer::Worker::worker_exit(EXIT_RECYCLE);
}

# The Emperor's bytes: stop now, stop gracefully, reload; its end of file
# (it is gone): a graceful stop, and what the app left in the session goes.
sub _solo_read_emperor {
    my ($self, $loop) = @_;
    my $solo = $self->{solo_state};
    my $got = sysread($solo->{emperor}, my $bytes, 64);
    if (!defined $got) {
        return if $! == EINTR || $! == EAGAIN;
        $got = 0;
    }
    if ($got == 0) {
        $solo->{emperor_vanished} = 1 unless $loop->{leaving} || $solo->{replacement_asked};
        $solo->{stop_heard} = 1;
        ${ $self->{stopping_ref} } = 1;
        return;
    }
    for my $b (unpack 'C*', $bytes) {
        if ($b == STOP_NOW) {
            # as a master's stop now ends its workers: no END blocks
            STDOUT->flush; STDERR->flush;
            POSIX::_exit(0);
        } elsif ($b == STOP) {
            $solo->{stop_heard} = 1;
            ${ $self->{stopping_ref} } = 1;
        } elsif ($b == RELOAD) {
            $self->_solo_replace($loop, 'reload');
        }
    }
}

# Asks the Emperor for a new process (byte 22: stop me) and goes on
# serving until the Emperor stops it, which it does once the successor
# accepts: no moment with nobody accepting, even when the successor waits
# out the back-off of a process that asked young. A process that gets no
# answer stops `mercy` seconds after asking; without an Emperor it just ends.
sub _solo_replace {
    my ($self, $loop, $why) = @_;
    my $solo = $self->{solo_state};
    return if $loop->{leaving} || $solo->{replacement_asked};
    $solo->{replacement_asked} = $why;
    $solo->{answer_due} = now() + $self->{mercy};
    ForkServer::Vassal::EmperorPipe->send($solo->{emperor}, DONE);
    $self->_flush_requests if $self->{requests_dirty};
    $loop->{leaving} = 1 unless $solo->{emperor};
}

sub _solo_settle {
    my ($self) = @_;
    my $settle = delete $self->{solo_state}{settle} or return;
    $settle->();
    return;
}

# Heartbeat and idle, as the master keeps them; returns the select timeout.
sub _solo_timers {
    my ($self, $now, $timeout) = @_;
    my $solo = $self->{solo_state};
    if ($solo->{replacement_asked} && !${ $self->{stopping_ref} }) {
        if ($solo->{answer_due} <= $now) { ${ $self->{stopping_ref} } = 1 }    # nobody answered
        elsif ($solo->{answer_due} - $now < $timeout) { $timeout = $solo->{answer_due} - $now }
    }
    if ($solo->{settle}) {
        if ($solo->{settle_at} <= $now) { $self->_solo_settle }
        elsif ($solo->{settle_at} - $now < $timeout) { $timeout = $solo->{settle_at} - $now }
    }
    if ($self->{heartbeat} > 0) {
        my $every = $self->{heartbeat} / 2;
        $solo->{next_heartbeat} //= $now;
        if ($solo->{next_heartbeat} <= $now) {
            ForkServer::Vassal::EmperorPipe->send($solo->{emperor}, HEARTBEAT);
            $solo->{next_heartbeat} = $now + $every;
        }
        my $left = $solo->{next_heartbeat} - $now;
        $timeout = $left if $left < $timeout;
    }
    if ($self->{idle} > 0 && !$solo->{idle_sent}) {
        my $at = $solo->{last_activity} + $self->{idle};
        if ($at <= $now) {
            ForkServer::Vassal::EmperorPipe->send($solo->{emperor}, DONE);    # idle: put me back to sleep
            $solo->{idle_sent} = 1;
        } elsif ($at - $now < $timeout) {
            $timeout = $at - $now;
        }
    }
    return $timeout;
}

# A worker's records to its master, taken here at once: the same calls
# (ForkServer::HTTPServer::Worker::worker_msg) reach this process's own state.
sub _solo_message {
    my ($self, $type) = @_;
    my $solo = $self->{solo_state};
    if ($type == MSG_ACTIVITY) {
        $solo->{last_activity} = now();
        $solo->{idle_sent} = 0;
    } elsif ($type == MSG_BUSY) {
        # the alarm is armed already (ForkServer::HTTPServer::Response)
        my $timer = $solo->{kill_timer} //= ForkServer::Process::KillTimer->new // 0;
        if ($timer) {
            $timer->arm($self->{harakiri} + HARAKIRI_BACKSTOP);
            $solo->{kill_armed} = 1;
            return;
        }
        unless ($solo->{alarm_reset}) {
            my $action = POSIX::SigAction->new($SIG{ALRM}, POSIX::SigSet->new, POSIX::SA_RESETHAND());
            $action->safe(1);
            POSIX::sigaction(POSIX::SIGALRM(), $action);
            $solo->{alarm_reset} = 1;
        }
        Time::HiRes::setitimer(Time::HiRes::ITIMER_REAL(), $self->{harakiri}, HARAKIRI_BACKSTOP);
    } elsif ($type == MSG_DONE) {
        $solo->{kill_timer}->disarm if delete $solo->{kill_armed};
    } elsif ($type == MSG_LEAVING) {
        $self->_solo_replace($self->{solo_loop}, 'max-requests');
    }
    return;
}

package ForkServer::HTTPServer::Solo::Messages;

# The handle a worker writes its records to (worker_msg's syswrite), tied
# to the process itself: no pipe, no system call.
sub TIEHANDLE { my ($class, $server) = @_; return bless { server => $server }, $class }

sub WRITE {
    my ($self, $buf) = @_;
    my (undef, $type) = unpack 'NN', $buf;
    $self->{server}->_solo_message($type);
    return length $buf;
}

sub CLOSE { return 1 }

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Solo - one process that serves without a master (C<master = false>)

=head1 DESCRIPTION

C<< ForkServer::HTTPServer->new(solo => 1, ...)->run >> runs this instead of
the master: the process serves its connections with the worker's loop
(L<ForkServer::HTTPServer::Worker>) and keeps the master's duties itself.

=over

=item Emperor pipe

Byte 5 and byte 17 once it accepts; byte 26 every C<heartbeat>/2 seconds
while it is not inside a request; byte 22 after C<idle> seconds without a
request. Byte 2 (and end of file: the Emperor is gone) stops it gracefully;
byte 0 ends it at once.

=item max-requests, reload

After C<max_requests> requests, or on SIGHUP or byte 1, it sends byte 22
and goes on serving until the Emperor stops it (byte 2, once the next
process accepts), or C<mercy> seconds later; then it finishes its
connections and exits. After C<psgix.harakiri.commit> it accepts nothing
more from the moment it asks.
Without an Emperor pipe, max-requests ends the process and SIGHUP only
opens the access log again.

=item harakiri

The request's alarm (C<harakiri> seconds) runs the worker's harakiri
handler (log line, exit status 86); if that handler cannot run, a timer of
the process's own (L<ForkServer::Process::KillTimer>) sends it SIGKILL a
second later.

=back

=cut
