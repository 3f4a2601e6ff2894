package ForkServer::HTTPServer::Worker;
use strict;
use warnings;

# A worker process of the HTTP server: its connection loop. It holds many
# connections and waits for all of them, the listener and its generation's
# stop pipe in one select(); only a complete request head makes it busy
# (ForkServer::HTTPServer::Request takes it from there).

use Errno qw(EINTR EAGAIN);
use Exporter 'import';
use IO::Handle ();
use POSIX ();
use Socket qw(MSG_DONTWAIT inet_aton pack_sockaddr_in);
use ForkServer::Process::Exit ();
use ForkServer::HTTPServer::Conns ();
use ForkServer::HTTPServer::Desk ();
use ForkServer::HTTPServer::DeskLook ();
use ForkServer::HTTPServer::Wire qw(now READ_CHUNK);

use constant {
    MSG_ACCEPTING => 1,    # worker -> master: I am in accept()
    MSG_ACTIVITY  => 2,    # worker -> master: a request arrived (for `idle`)
    MSG_BUSY      => 3,    # worker -> master: in a request (harakiri only), payload: request
    MSG_DONE      => 4,    # worker -> master: request finished (harakiri only)
    MSG_LEAVING   => 5,    # worker -> master: recycling; accepts nothing more, replace me now
    EXIT_HARAKIRI => 86,   # worker exit status after harakiri
    EXIT_RECYCLE  => 0,
    MAX_CONNS     => 512,  # connections one worker holds open (idle and partial heads cost no worker time)
};

our %EXPORT_TAGS = (msg => [qw(MSG_ACCEPTING MSG_ACTIVITY MSG_BUSY MSG_DONE MSG_LEAVING
                               EXIT_HARAKIRI EXIT_RECYCLE worker_msg)]);
our @EXPORT_OK = (@{ $EXPORT_TAGS{msg} }, 'worker_exit');

# A worker's SIGTERM: the flag its loop reads. The handler is made here,
# once, in the base: built in each worker, its objects (a SigSet, a
# SigAction's hash, a closure) cost some 30 copy-on-write page faults.
our $STOPPING = 0;
my $ON_TERM = POSIX::SigAction->new(sub { $STOPPING = 1 }, POSIX::SigSet->new, POSIX::SA_RESTART());
$ON_TERM->safe(1);

# Worker -> master records: pid, type, payload length, payload. Each is
# written with one write(2) of less than PIPE_BUF bytes, so records of
# different workers never interleave.
sub worker_msg {
    my ($fh, $type, $payload) = @_;
    $payload //= '';
    syswrite($fh, pack('NNn/a*', $$, $type, substr($payload, 0, 400)));
}

# A worker that stops (a graceful stop, a reload, max-requests) leaves as
# under any Plack server: the app's END blocks run, what the worker holds is
# freed and its handles flushed, without the global destruction of the
# heap it inherited (ForkServer::Process::Exit). A harakiri is immediate.
sub worker_exit {
    my $code = shift;
    STDOUT->flush; STDERR->flush;
    POSIX::_exit($code) if $code == EXIT_HARAKIRI;
    ForkServer::Process::Exit::without_global_destruction();
    exit $code;
}

sub _worker_main {
    my ($self, $slot) = @_;
    $self->_worker_setup($slot);
    my $listen = $self->{listen_sock};
    # Every worker waits for the listener in select() beside its own
    # connections; the one that loses the race to accept() gets EAGAIN.
    IO::Handle::blocking($listen, 0);
    worker_msg($self->{ready_w}, MSG_ACCEPTING);

    # Connections this worker holds: idle keep-alive ones and ones whose
    # head is still arriving cost a select() slot, not the worker. Only a
    # complete head makes the worker busy, so a slow or idle client never
    # keeps the others waiting.
    my $loop = {
        conns        => {},
        pending      => {},     # fd => 1: a complete head may already be buffered
        buffered     => {},     # fd => 1: bytes read and not served yet (never taken by a sibling)
        leaving      => 0,      # stop, recycle or harakiri commit: accept nothing more
        stop_seen_at => undef,
        lfd          => fileno $listen,
        stop_fd      => fileno $self->{stop_r},
        stimeo       => pack('l!l!', $self->{socket_timeout}, 0),
        # with siblings: the shared queue of connections (Handoff)
        handoff      => $self->{workers} > 1 && $self->{keepalive_handoff} ? $self->{handoff} : undef,
    };
    if ($loop->{handoff}) {
        $loop->{hfd} = fileno $loop->{handoff}{take};
        # this worker's byte of the board, in its generation's half
        $loop->{board_index} = ($self->{gen} % 2) * $self->{workers} + $slot - 1;
        $loop->{board_count} = 2 * $self->{workers};
        $loop->{free} = 0;
        # where the system allows it, a free sibling takes this worker's idle
        # connections once its request has run a while (Desk), and nothing
        # moves at the start of a request
        $loop->{join_at} = 0;
    }
    while (1) {
        my $now = now();
        last unless $self->_wind_down($loop, $now);
        my ($rin, $timeout) = $self->_select_set($loop, $now);
        $self->_flush_requests if $self->{requests_dirty};
        ForkServer::HTTPServer::Conns::_mark_free($loop, 1) if $timeout > 0;
        $loop->{select_at} = now();
        my $n = select(my $rout = $rin, undef, undef, $timeout);
        if ($n < 0) {
            next if $! == EINTR;
            die "select: $!\n";
        }
        my $ready = $self->_ready_conns($loop, $n > 0 ? $rout : undef);
        $loop->{ready} = $ready;
        # One request per ready connection per round: fair between them.
        $self->_serve_conn($loop, $_) for sort { $a <=> $b } keys %$ready;
    }
    $self->_flush_requests if $self->{requests_dirty};
    ForkServer::HTTPServer::Conns::_mark_free($loop, 0);
    ForkServer::HTTPServer::Desk::leave_desk($loop->{seat});
    worker_exit(EXIT_RECYCLE);
}

sub _worker_setup {
    my ($self, $slot) = @_;
    # The master asks a worker to stop by closing its generation's stop
    # pipe (end of file in the worker's select), not by a signal. A SIGTERM
    # from elsewhere only sets the same flag, with SA_RESTART, so that the
    # app's blocking reads are restarted, not broken with EINTR.
    $STOPPING = 0;
    POSIX::sigaction(POSIX::SIGTERM(), $ON_TERM);
    $SIG{HUP}  = 'IGNORE';          # the master reloads; a worker keeps going
    $SIG{INT}  = 'DEFAULT';
    $SIG{QUIT} = 'DEFAULT';
    $SIG{CHLD} = 'DEFAULT';
    $SIG{PIPE} = 'IGNORE';          # a vanished client is an EPIPE, not a death
    $self->{stopping_ref} = \$STOPPING;
    $self->{slot} = $slot;
    # Its own rand() sequence was seeded at its fork (Kids, or the spare's
    # prefork: ForkServer::Process::Random), not again here.
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), delete $self->{sigmask});
    worker_exit(0) if getppid() != $self->{master_pid};

    close $self->{ready_r};
    # The Emperor pipe and the config pipe belong to the master alone: a
    # worker holding them would hide the master's death from the Emperor,
    # or read what the Emperor sends the master.
    for my $key (qw(emperor_fh config_fh)) {
        my $fh = delete $self->{$key} or next;
        close $fh;
    }
    $0 = "$self->{proctitle} worker $slot" if length $self->{proctitle};
    $self->_open_requests_slot($slot);

    if (my $h = $self->{harakiri}) {
        $SIG{ALRM} = sub {
            my $req = $self->{current_request} // '(unknown request)';
            $self->_log("harakiri: worker $slot (pid $$) stuck more than ${h}s in $req, killed");
            worker_exit(EXIT_HARAKIRI);
        };
    }
    $self->{requests} = 0;
}

# A leaving worker closes its idle connections once nothing has arrived on
# them for stop_grace: a request the client sent right after its last
# response is served (with Connection: close), never dropped. False when
# the worker is done.
sub _wind_down {
    my ($self, $loop, $now) = @_;
    $loop->{leaving} = 1 if ${ $self->{stopping_ref} };
    ForkServer::HTTPServer::Conns::_seat($self, $loop, $now) if $loop->{handoff};
    return 1 unless $loop->{leaving};
    $loop->{stop_seen_at} //= $now;
    if ($now - $loop->{stop_seen_at} >= $self->{stop_grace}) {
        for my $fd (keys %{ $loop->{conns} }) {
            next if length $loop->{conns}{$fd}{buf} || $loop->{pending}{$fd};
            ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
        }
    }
    return %{ $loop->{conns} } ? 1 : 0;
}

# The select() read set and timeout; connections past their deadline go.
sub _select_set {
    my ($self, $loop, $now) = @_;
    my $conns = $loop->{conns};
    my $timeout = %{ $loop->{pending} } ? 0 : 1;
    my $rin = '';
    vec($rin, $loop->{stop_fd}, 1) = 1 unless $loop->{leaving};
    vec($rin, $loop->{hfd}, 1) = 1 if defined $loop->{hfd} && !$loop->{leaving};
    my $idle = 0;
    for my $fd (keys %$conns) {
        my $c = $conns->{$fd};
        if ($c->{deadline} <= $now) {
            # A head that did not arrive in time gets 408; an idle
            # keep-alive connection is just closed.
            $self->_error_response($c->{sock}, 408, undef, $c) if length $c->{buf};
            ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
            next;
        }
        $idle++ unless $c->{in_head};
        # A connection that holds a whole head is not read until it has
        # been served (it is pending): a pipelining client waits in its
        # own socket buffers, not in the worker's memory.
        vec($rin, $fd, 1) = 1 unless $loop->{pending}{$fd};
        my $left = $c->{deadline} - $now;
        $timeout = $left if $left < $timeout;
    }
    # At MAX_CONNS the listener is still watched while an idle keep-alive
    # connection can make room for a new client (_make_room).
    vec($rin, $loop->{lfd}, 1) = 1 if !$loop->{leaving} && (keys %$conns < MAX_CONNS || $idle);
    if ((my $seat = $loop->{seat}) && !$loop->{leaving}) {
        ForkServer::HTTPServer::DeskLook::watch($seat, $now) if $now >= $seat->{watch_at};
        $rin |= $seat->{timer_rin};
        $timeout = ForkServer::HTTPServer::DeskLook::sleeping($seat, $now, $timeout) if $timeout > 0;
    }
    if ($loop->{leaving}) {
        my $left = $loop->{stop_seen_at} + $self->{stop_grace} - $now;
        $timeout = $left if $left < $timeout;
        $timeout = 0 if $timeout < 0;
    }
    return ($rin, $timeout);
}

# Connections to look at this round ($rout undef: select() timed out).
sub _ready_conns {
    my ($self, $loop, $rout) = @_;
    my %ready = %{ $loop->{pending} };
    %{ $loop->{pending} } = ();
    # a busy sibling's request that ran long: its waiting connections (Desk)
    $self->_take_from_sibling($loop, $_, \%ready, MAX_CONNS)
        for $loop->{seat} && !$loop->{leaving} ? ForkServer::HTTPServer::DeskLook::due($loop->{seat}, $rout, now()) : ();
    return \%ready unless defined $rout;
    if (!$loop->{leaving} && vec($rout, $loop->{stop_fd}, 1)) {
        ${ $self->{stopping_ref} } = 1;
        $loop->{leaving} = 1;
    }
    if (!$loop->{leaving} && vec($rout, $loop->{lfd}, 1)) {
        if (my $c = $self->_accept($self->{listen_sock}, $loop->{stimeo})) {
            # after the accept: a client another worker took costs no one
            # a connection
            ForkServer::HTTPServer::Conns::_make_room($loop) if keys %{ $loop->{conns} } >= MAX_CONNS;
            my $fd = ForkServer::HTTPServer::Conns::_added($loop, $c);
            # Linux defers accept until data arrived only with
            # TCP_DEFER_ACCEPT; try a read at once anyway, the head is
            # usually there already.
            $ready{$fd} = 1;
        }
    }
    if (defined $loop->{hfd} && !$loop->{leaving} && vec($rout, $loop->{hfd}, 1)) {
        for my $c ($self->_take_conns($loop)) {
            ForkServer::HTTPServer::Conns::_make_room($loop) if keys %{ $loop->{conns} } >= MAX_CONNS;
            my $fd = ForkServer::HTTPServer::Conns::_added($loop, $c);
            $ready{$fd} = 1;    # a request may be waiting in it already
        }
    }
    for my $fd (keys %{ $loop->{conns} }) { $ready{$fd} = 1 if vec($rout, $fd, 1) }
    return \%ready;
}

# Reads what a ready connection has and serves one request if its head is complete.
sub _serve_conn {
    my ($self, $loop, $fd) = @_;
    $self->_serve_conn_once($loop, $fd);
    $self->{after_request}->() if $self->{after_request};    # what the app loaded lazily, to the base
    # with a seat at the desk: bytes read from it stay here (Desk::busy)
    if ($loop->{seat}) {
        my $c = $loop->{conns}{$fd};
        if ($c && length $c->{buf})   { $loop->{buffered}{$fd} = 1 }
        elsif (%{ $loop->{buffered} }) { delete $loop->{buffered}{$fd} }
    }
    return;
}

sub _serve_conn_once {
    my ($self, $loop, $fd) = @_;
    my $c = $loop->{conns}{$fd} or return;
    # Bytes left after a request (pipelined) are served before anything
    # more is read; only an incomplete head (at most max_header_size) reads
    # on. What a pipelining client sends meanwhile waits in the socket
    # buffers: it costs the worker one read's worth of memory at most.
    my $got = -1;
    if (!length $c->{buf} || $c->{partial}) {
        # never blocks: a pending connection may have nothing new
        $got = recv($c->{sock}, my $more, READ_CHUNK, MSG_DONTWAIT);
        if (defined $got) { $got = length $more; $c->{buf} .= $more }
    }
    if (!defined $got) {
        return ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd) unless $! == EAGAIN || $! == EINTR;
    } elsif ($got == 0) {
        # end of file: a request already buffered is still answered
        $c->{eof} = 1;
        return ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd) unless length $c->{buf};
    }
    return unless length $c->{buf};
    $self->_head_begins($c) unless $c->{in_head};
    # A whole head: this worker is busy from now on, for as long as the app
    # takes. Its other connections (listed on the desk, or, without one,
    # given to the shared queue) are a free sibling's to serve: what nginx
    # sends on them next does not wait for this request.
    my $listed;
    if (my $seat = $loop->{seat}) {
        $listed = ($loop->{conns_changed} || $seat->{excluding} || %{ $loop->{buffered} } ? ForkServer::HTTPServer::Conns::_list_idle($loop, $fd)
                   : ForkServer::HTTPServer::Desk::busy($seat, $fd)) if keys %{ $loop->{conns} } > 1;
    } elsif ($loop->{handoff} && $c->{buf} =~ /\n\r?\n/) {
        ForkServer::HTTPServer::Conns::_mark_free($loop, 0);
        $self->_give_idle($loop, $fd) if keys %{ $loop->{conns} } > 1;
    }
    my $keep = eval { $self->_serve_head($c) };
    # what a sibling took meanwhile is its own now: these copies close unread
    if ($listed) { ForkServer::HTTPServer::Conns::_drop_conn($loop, $_) for ForkServer::HTTPServer::Desk::back($loop->{seat}) }
    $c->{partial} = defined $keep && $keep eq 'partial';
    if (!defined $keep) {
        $self->_log($@) if $@ && $@ !~ /^ForkServer::client-gone/;
        return ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
    } elsif ($keep eq 'partial') {
        ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd) if $c->{eof};
        return;
    } elsif (!$keep) {
        ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
    } else {
        # Served, connection kept: idle until the next byte, and pipelined
        # bytes already here are looked at next round.
        $c->{in_head} = 0;
        $c->{idle_since} = now();
        $c->{deadline} = $c->{idle_since} + $self->{keepalive_timeout};
        if ($c->{eof} && !length $c->{buf}) {
            ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
        } elsif (length $c->{buf}) {
            $self->_head_begins($c);
            $loop->{pending}{$fd} = 1;
        }
    }
    if (!$loop->{leaving} && ($self->{harakiri_commit}
        || ($self->{max_requests} && $self->{requests} >= $self->{max_requests}))) {
        # The replacement starts now, from its requests slot and desk place (left first).
        $self->_flush_requests if $self->{requests_dirty};
        ForkServer::HTTPServer::Desk::leave_desk(delete $loop->{seat});
        worker_msg($self->{ready_w}, MSG_LEAVING);
        # without a master it accepts until its successor does (Solo.pm), but harakiri.commit
        $loop->{leaving} = 1 unless $self->{solo_state} && !$self->{harakiri_commit};
    }
}

# Has the master closed this generation's stop pipe (or a SIGTERM come)?
sub _stop_asked {
    my $self = shift;
    my $flag = $self->{stopping_ref};
    return 1 if $$flag;
    my $r = $self->{stop_r} or return 0;
    my $rin = '';
    vec($rin, fileno $r, 1) = 1;
    $$flag = 1 if select($rin, undef, undef, 0) > 0;
    return $$flag;
}

# One connection served to its end, outside the loop and before any real
# one: a spare's waiting worker rehearses the request path with a stand-in
# app over a socket pair (ForkServer::Spares::Rehearsal), as if from 127.0.0.1.
sub serve_one {
    my ($self, $conn) = @_;
    local $self->{stopping_ref} = \(my $stopping = 0);
    local @$self{qw(server_name server_port after_request)} = ('127.0.0.1', 80);    # a rehearsal reports nothing
    my $c = $self->_conn($conn, pack_sockaddr_in(0, inet_aton('127.0.0.1')), pack('l!l!', $self->{socket_timeout}, 0));
    my $fd = fileno $conn;
    my $loop = { conns => { $fd => $c }, pending => {}, leaving => 0 };
    for (1 .. 4) {    # one request; a few reads at most
        last unless $loop->{conns}{$fd};
        $self->_serve_conn($loop, $fd);
    }
    ForkServer::HTTPServer::Conns::_drop_conn($loop, $fd);
    return;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Worker - the connection loop of a worker of L<ForkServer::HTTPServer>

=head1 DESCRIPTION

The methods of the server object that run in a worker: set-up after the
fork (signals, the stop flag, harakiri's alarm), and the loop that holds up
to C<MAX_CONNS> connections in one C<select()> (at it, a new client
closes the idle keep-alive connection that waited longest; a connection
whose buffer holds a whole head is not read until that request is served) with the listener and the
generation's stop pipe, enforces the head and keep-alive deadlines, serves
one request per ready connection per round (a worker with siblings that
starts a request first gives its quiet idle connections to the workers'
shared queue, L<ForkServer::HTTPServer::Handoff>, with those whose
request is waiting when a sibling is free, and takes connections from it
while free: L<ForkServer::HTTPServer::Conns>), and winds down (stop,
recycling, C<psgix.harakiri.commit>) without dropping a request already on
its way. Also C<worker_msg()> (the records to the master, C<MSG_*>) and
C<worker_exit()>.

=cut
