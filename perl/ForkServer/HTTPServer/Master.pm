package ForkServer::HTTPServer::Master;
use strict;
use warnings;

# The master process of the HTTP server: listener, workers (reload,
# harakiri's backstop, stop; spawning and reaping them is
# ForkServer::HTTPServer::Kids), and its duties on
# the Emperor pipe (accepting, loyal, heartbeat, idle; stop and reload
# requests). It never touches a client connection.

use Config ();
use Errno qw(EINTR EAGAIN);
use POSIX ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Process::Session ();
use ForkServer::Process::Exit ();
use ForkServer::Protocol qw(:vassal_bytes :emperor_bytes);    # the Emperor pipe's bytes
use ForkServer::HTTPServer::Counts ();
use ForkServer::HTTPServer::Handoff ();
use ForkServer::HTTPServer::Listener ();
use ForkServer::HTTPServer::Wire qw(now);
use ForkServer::HTTPServer::Worker qw(:msg);

sub run {
    my $self = shift;
    return $self->run_solo if $self->{solo};

    # Signals only set flags; the loop acts on them. The select() timeout is
    # capped so a signal landing just before select() is seen within 1 s.
    my %sig;
    local $SIG{HUP}  = sub { $sig{HUP}  = 1 };
    local $SIG{TERM} = sub { $sig{TERM} = 1 };
    local $SIG{INT}  = sub { $sig{INT}  = 1 };
    local $SIG{QUIT} = sub { $sig{INT}  = 1 };
    local $SIG{CHLD} = sub { $sig{CHLD} = 1 };
    local $SIG{PIPE} = 'IGNORE';

    $self->_master_init;
    # what a worker frees at its exit: the packages that are not there now
    # (an adopted vassal's base marked its own, earlier)
    ForkServer::Process::Exit::mark_base() unless ForkServer::Process::Exit::marked();
    while (1) {
        if (delete $sig{CHLD}) { $self->_reap }
        if (delete $sig{INT})  { $self->_stop_now; last }
        if (delete $sig{TERM}) { $self->_begin_graceful_stop }
        if (delete $sig{HUP})  { $self->_reload }

        if ($self->{stopping}) {
            last unless %{ $self->{kids} };
            if (now() >= $self->{kill_at}) {
                kill 'KILL', keys %{ $self->{kids} };
                $self->{kill_at} = now() + 3600;   # only once; the reaping goes on
            }
        }
        $self->_copy_requests;
        my $timeout = $self->_master_timers;

        my $rin = '';
        vec($rin, fileno($self->{ready_r}), 1) = 1;
        vec($rin, fileno($self->{emperor_fh}), 1) = 1 if $self->{emperor_open};
        next if %sig;    # a signal arrived while we were busy: no waiting
        my $n = select(my $rout = $rin, undef, undef, $timeout);
        next if $n <= 0;

        if (vec($rout, fileno($self->{ready_r}), 1)) { $self->_read_worker_messages }
        if ($self->{emperor_open} && vec($rout, fileno($self->{emperor_fh}), 1)) {
            $self->_read_emperor(\%sig);
        }
    }

    $self->_reap_blocking;
    unlink $self->{requests_file} if $self->{requests_file};
    $self->_end_session if $self->{emperor_vanished};
    close $self->{ready_r}; close $self->{ready_w};
    if ($self->{own_listener}) { close $self->{listen_sock}; }
    return;
}

sub _master_init {
    my $self = shift;
    ForkServer::HTTPServer::Listener::setup($self);
    $0 = $self->{proctitle} if length $self->{proctitle};

    # A spare's first worker (ForkServer::Spares) exists already, with these pipes.
    my $pre = delete $self->{preforked};
    my ($ready_r, $ready_w);
    if ($pre) { ($ready_r, $ready_w) = @$pre{qw(ready_r ready_w)} }
    else      { pipe($ready_r, $ready_w) or die "pipe: $!" }
    $self->{ready_r} = $ready_r;
    $self->{ready_w} = $ready_w;
    $self->{master_pid} = $$;
    $self->{gen} = 1;
    $self->_open_requests_file(shared => $pre ? 1 : 0);
    # the workers' counts, in memory (ForkServer::HTTPServer::Counts): a
    # spare's first worker counts in the one its spare made
    $self->{requests_mem} = $pre ? $pre->{handoff_counts}
                          : ForkServer::HTTPServer::Counts::requests_memory()
        if $self->{requests_file};
    $self->{kids} = {};        # pid => { slot, gen, ready, born }
    $self->{slot_fast_deaths} = {};
    $self->{respawn} = {};     # slot => time
    if ($pre) { @$self{qw(stop_r stop_w)} = @$pre{qw(stop_r stop_w)} }
    else      { $self->_new_stop_pipe }
    # every generation's workers share it: connections given away by a
    # worker of the old one are served by the new one. A lone worker has
    # no sibling to give to (ForkServer::HTTPServer::Worker): no queue,
    # no desk, descriptors and memfds fewer in every single-worker vassal.
    if ($self->{workers} > 1 && $self->{keepalive_handoff}) {
        my $pair = $pre && $pre->{handoff_take}
            ? { take => $pre->{handoff_take}, give => $pre->{handoff_give}, desk => $pre->{handoff_desk} }
            : ForkServer::HTTPServer::Handoff::pair();
        $self->{handoff} = ForkServer::HTTPServer::Handoff::with_board(@$pair{qw(take give desk)});
    }
    $self->{sent_accepting} = 0;
    $self->{sent_loyal} = 0;
    $self->{stopping} = 0;     # 0, 'graceful' or 'now'
    $self->{kill_at} = undef;  # stopping: when what is left gets SIGKILL
    $self->{emperor_open} = $self->{emperor_fh} ? 1 : 0;

    $self->{server_ready}->({
        host => $self->{server_name}, port => $self->{server_port},
        server_software => 'ForkServer',
    }) if $self->{server_ready};

    $self->{kids}{ $pre->{pid} } = { slot => 1, gen => 1, ready => 0, born => now() } if $pre;
    $self->_spawn_worker($_) for ($pre ? 2 : 1) .. $self->{workers};

    $self->{heartbeat_every} = $self->{heartbeat} > 0 ? $self->{heartbeat} / 2 : 0;
    $self->{next_heartbeat} = undef;
    $self->{last_activity} = now();
    $self->{idle_sent} = 0;
}

# Whatever is due now (respawns, kills, heartbeat, idle) is done; returns
# how long select() may wait for the next one.
sub _master_timers {
    my $self = shift;
    my $now = now();
    my $timeout = 1;
    my $due = sub {    # true when $at has come; else shortens the wait
        my $at = shift;
        return 1 if $at <= $now;
        $timeout = $at - $now if $at - $now < $timeout;
        return 0;
    };
    if ($self->{stopping}) {
        my $left = $self->{kill_at} - $now;
        return $left < 0 ? 0 : $left < $timeout ? $left : $timeout;
    }
    # respawns waiting out a crash-loop back-off
    for my $slot (keys %{ $self->{respawn} }) {
        next unless $due->($self->{respawn}{$slot});
        delete $self->{respawn}{$slot};
        $self->_spawn_worker($slot);
    }
    $self->_harakiri_backstop($due) if $self->{harakiri};
    for my $pid (keys %{ $self->{kids} }) {
        my $at = $self->{kids}{$pid}{kill_at} // next;
        next unless $due->($at);
        $self->_log("worker pid $pid still busy $self->{mercy}s after reload, killed");
        kill 'KILL', $pid;
        $self->{kids}{$pid}{kill_at} = $now + 3600;
    }
    if ($self->{heartbeat_every} && $self->{sent_accepting}) {
        $self->{next_heartbeat} //= $now;
        if ($due->($self->{next_heartbeat})) {
            ForkServer::Vassal::EmperorPipe->send($self->{emperor_fh}, HEARTBEAT);
            $self->{next_heartbeat} = $now + $self->{heartbeat_every};
            $due->($self->{next_heartbeat});
        }
    }
    if ($self->{idle} > 0 && !$self->{idle_sent} && $due->($self->{last_activity} + $self->{idle})) {
        ForkServer::Vassal::EmperorPipe->send($self->{emperor_fh}, DONE);    # idle: put me back to sleep
        $self->{idle_sent} = 1;
    }
    return $timeout < 0 ? 0 : $timeout;
}

# Harakiri, master side: the worker's own alarm normally ends it; this
# catches one whose Perl signal handler cannot run (stuck inside an XS call
# that restarts on EINTR).
sub _harakiri_backstop {
    my ($self, $due) = @_;
    my $h = $self->{harakiri};
    for my $pid (keys %{ $self->{kids} }) {
        my $k = $self->{kids}{$pid};
        my $since = $k->{busy_since} // next;
        next unless $due->($since + $h + 1);
        $self->_log("harakiri: worker $k->{slot} (pid $pid) stuck more than ${h}s in $k->{request}, killed by the master");
        kill 'KILL', $pid;
        delete $k->{busy_since};
    }
}

sub _read_emperor {
    my ($self, $sig) = @_;
    my $got = sysread($self->{emperor_fh}, my $bytes, 64);
    if (defined $got && $got == 0) {
        # The Emperor is gone (CONTRACT.md): graceful stop, and nobody is
        # left to stop this vassal's helpers but us.
        $self->{emperor_open} = 0;
        $self->{emperor_vanished} = 1 unless $self->{stopping};
        $self->_begin_graceful_stop;
    } elsif ($got) {
        for my $b (unpack 'C*', $bytes) {
            if ($b == STOP_NOW) { $sig->{INT} = 1 }
            elsif ($b == RELOAD) { $sig->{HUP} = 1 }
            elsif ($b == STOP) { $sig->{TERM} = 1 }
        }
    } elsif ($! != EINTR && $! != EAGAIN) {
        $self->{emperor_open} = 0;
        $self->_begin_graceful_stop;
    }
}

sub _reload {
    my $self = shift;
    return if $self->{stopping};
    # New workers from the app already in memory; the old generation is
    # told to stop, which an idle worker obeys at once and a busy one after
    # its in-flight request.
    my @old = keys %{ $self->{kids} };
    $self->{gen}++;
    %{ $self->{respawn} } = ();
    # an old worker still busy after `mercy` seconds is killed
    my $deadline = now() + $self->{mercy};
    $self->{kids}{$_}{kill_at} //= $deadline for @old;
    # The old generation's stop pipe reaches end of file: no signal, so an
    # app's blocking call in a busy worker is never interrupted.
    $self->_new_stop_pipe;
    $self->_reopen_access_log if defined $self->{access_log_path};
    $self->_spawn_worker($_) for 1 .. $self->{workers};
}

# A reload reopens the access log file, so a rotated log is let go of; the
# old generation writes its last lines to the old file.
sub _reopen_access_log {
    my $self = shift;
    my $path = $self->{access_log_path};
    if (open my $fh, '>>', $path) {
        $self->{access_log} = $fh;
    } else {
        $self->_log("cannot reopen access-log '$path': $!; still writing to the old file");
    }
}

sub _begin_graceful_stop {
    my $self = shift;
    return if $self->{stopping};
    $self->{stopping} = 'graceful';
    close delete $self->{stop_w} if $self->{stop_w};
    close delete $self->{stop_r} if $self->{stop_r};
    $self->{kill_at} = now() + $self->{mercy};
}

# Workers learn that they should stop from their generation's pipe reaching
# end of file (the master closed it, or died), never from a signal that
# would interrupt the app they are running.
sub _new_stop_pipe {
    my $self = shift;
    close delete $self->{stop_w} if $self->{stop_w};
    close delete $self->{stop_r} if $self->{stop_r};
    pipe(my $r, my $w) or die "pipe: $!";
    @$self{qw(stop_r stop_w)} = ($r, $w);
}

sub _stop_now {
    my $self = shift;
    $self->{stopping} = 'now';
    kill 'KILL', keys %{ $self->{kids} };
}

# The Emperor died without stopping us: whatever the app left in this
# vassal's session (helpers double-forked without setsid) goes with it, as
# the Emperor would have done.
sub _end_session {
    my $self = shift;
    ForkServer::Process::Session::end_others(leader_only => 1, log => sub {
        $self->_log("the Emperor is gone; stopping $_[0] process(es) left in the vassal's session");
    });
    return;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Master - the master process of L<ForkServer::HTTPServer>

=head1 DESCRIPTION

The methods of the server object that run in the master: C<run()> (the
loop: signals as flags, one C<select()> on the workers' message pipe and the
Emperor pipe), the listener, spawning and reaping workers (with the
crash-loop back-off), reload by generation, harakiri's backstop, graceful
and immediate stop, and the Emperor pipe's bytes (L<ForkServer::Protocol>'s
names, PROTOCOL.md section 5). See L<ForkServer::HTTPServer> for the options and signals.

=cut
