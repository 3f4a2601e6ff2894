package ForkServer::HTTPServer::Conns;
use strict;
use warnings;

# The connections a worker holds (ForkServer::HTTPServer::Worker's loop):
# made from accept() or from a sibling's hand-over, their deadlines, room at
# MAX_CONNS, closing, and giving them to the workers' shared queue
# (ForkServer::HTTPServer::Handoff) when a sibling can serve them sooner.

use Errno qw(EINTR EAGAIN ECONNABORTED);
use POSIX ();
use Socket qw(IPPROTO_TCP TCP_NODELAY SOL_SOCKET SO_RCVTIMEO SO_SNDTIMEO AF_INET AF_INET6
              inet_ntop unpack_sockaddr_in unpack_sockaddr_in6 sockaddr_family);
use ForkServer::HTTPServer::Desk ();
use ForkServer::HTTPServer::DeskLook ();
use ForkServer::HTTPServer::Handoff ();
use ForkServer::HTTPServer::Wire qw(now);
use constant NEVER => 9**9**9;

# This worker's byte of the board (Handoff): free while it waits in
# select() with nothing to do; written on a change only.
sub _mark_free {
    my ($loop, $free) = @_;
    return unless $loop->{handoff} && $loop->{free} != $free;
    ForkServer::HTTPServer::Handoff::mark($loop->{handoff}, $loop->{board_index}, $free);
    $loop->{free} = $free;
    return;
}

# At MAX_CONNS, a new client closes the idle keep-alive connection that has
# waited longest (as nginx does), never one with a request under way
# (_select_set watches the listener only while there is one).
sub _make_room {
    my $loop = shift;
    my $conns = $loop->{conns};
    my ($oldest, $at);
    for my $fd (keys %$conns) {
        my $c = $conns->{$fd};
        next if $c->{in_head};
        # idle ones share keepalive_timeout: the earliest deadline is the oldest
        ($oldest, $at) = ($fd, $c->{deadline}) if !defined $at || $c->{deadline} < $at;
    }
    _drop_conn($loop, $oldest) if defined $oldest;
    return;
}

# Idle kept connections that stayed quiet through a whole select() (nothing
# buffered, nothing pending, nothing to read) other than $busy_fd go to the
# shared queue; kept when the queue is full. Those with a request waiting
# in the socket, or just answered (a client under load sends its next
# request at once), go too when a sibling is free to serve them now: it
# would otherwise wait for this request, however long it takes. With every
# sibling busy they stay, to be served here next: moving them then would
# cost every request a hand-over. Bytes this worker has read (a pipelined
# or partial head) never move.
sub _give_idle {
    my ($self, $loop, $busy_fd) = @_;
    my $conns = $loop->{conns};
    my $ready = $loop->{ready} // {};
    my $sibling_free;
    my @give = map { [$_, $conns->{$_}{in_head} ? 0 : 1] }
               grep {
                   my $c = $conns->{$_};
                   $_ != $busy_fd && !length $c->{buf}
                   && ((!$loop->{pending}{$_} && !$ready->{$_}
                        && ($c->{idle_since} // 'inf') < $loop->{select_at})
                       || ($sibling_free //= ForkServer::HTTPServer::Handoff::sibling_free(
                               $loop->{handoff}, $loop->{board_index}, $loop->{board_count})))
               }
               keys %$conns;
    return unless @give;
    my $sent = ForkServer::HTTPServer::Handoff::give($loop->{handoff}{give}, @give);
    _drop_conn($loop, $_->[0]) for @give[0 .. $sent - 1];
    return;
}

# With a seat at the desk (Desk): this worker starts a request on
# $busy_fd; a free sibling may take its other connections with a request
# waiting should this one run long, except those with bytes read already.
# True when any may go (then Desk::back when the request is done).
sub _list_idle {
    my ($loop, $busy_fd) = @_;
    my $seat = $loop->{seat};
    # the list is written again only when it changed
    if ($loop->{conns_changed} || $seat->{excluding} || %{ $loop->{buffered} }) {
        my $conns = $loop->{conns};
        my $list = $loop->{conns_changed} || !$seat->{listed}
            ? [map { [$_, $conns->{$_}{in_head} ? 0 : 1] } keys %$conns] : $seat->{listed};
        my $excluded = [grep { $_ != $busy_fd && $conns->{$_} } keys %{ $loop->{buffered} }];
        return 0 unless ForkServer::HTTPServer::Desk::list($seat, $list, @$excluded ? $excluded : undef);
        delete $loop->{conns_changed};
    }
    return ForkServer::HTTPServer::Desk::busy($seat, $busy_fd);
}

# This worker's seat at the desk (Desk), in its loop, between requests.
# Leaving (a stop, a reload), it gets up at once: the next generation but
# one is given its index, and two workers writing one slot and record
# would each close or serve what a sibling took from the other (a body's
# bytes read as a head, a response to another request). Its index still
# held by such a worker, it joins later.
sub _seat {
    my ($self, $loop, $now) = @_;
    if ($loop->{leaving}) {
        ForkServer::HTTPServer::Desk::leave_desk(delete $loop->{seat}) if $loop->{seat};
        return;
    }
    return if $loop->{seat} || $now < ($loop->{join_at} // NEVER);
    my ($seat, $why) = ForkServer::HTTPServer::Desk::join_desk(
        $loop->{handoff}{desk}, $loop->{board_index}, $loop->{board_count}, $self->{desk_dumpable});
    $loop->{join_at} = $why && $why eq 'held' ? $now + 0.1 : undef;
    $loop->{seat} = $seat or return;
    # bytes read from them stay here (Desk::busy): held from before the seat
    my $conns = $loop->{conns};
    $loop->{buffered} = { map { $_ => 1 } grep { length $conns->{$_}{buf} } keys %$conns };
    $loop->{conns_changed} = 1;
    return;
}

# A connection came (accepted, given, taken): the desk's list is written
# again at the next request.
sub _added {
    my ($loop, $c) = @_;
    my $fd = fileno $c->{sock};
    $loop->{conns}{$fd} = $c;
    $loop->{conns_changed} = 1;
    return $fd;
}

# A sibling's timer went off: what waits on its listed connections is
# this worker's to serve ($ready), up to $max connections.
sub _take_from_sibling {
    my ($self, $loop, $index, $ready, $max) = @_;
    for my $got (ForkServer::HTTPServer::DeskLook::take_from($loop->{seat}, $index, scalar keys %{ $loop->{conns} })) {
        my $c = $self->_adopted_conn(@$got) // next;
        _make_room($loop) if keys %{ $loop->{conns} } >= $max;
        $ready->{ _added($loop, $c) } = 1;
    }
    return;
}

# A connection from another worker (its descriptor, now this process's):
# idle kept ones (state 1) wait for their next request for
# keepalive_timeout, others for their head's first bytes.
sub _adopted_conn {
    my ($self, $fd, $idle) = @_;
    open(my $sock, '+<&=', $fd) or do { POSIX::close($fd); return undef };
    my $peer = getpeername($sock) // '';
    my $c = $self->_conn_from($sock, $peer);
    if ($idle) {
        $c->{in_head} = 0;
        $c->{idle_since} = now();
        $c->{deadline} = now() + $self->{keepalive_timeout};
    }
    return $c;
}

# Connections a sibling gave away: idle kept ones (state 1) wait for their
# next request for keepalive_timeout, others for their head's first bytes.
sub _take_conns {
    my ($self, $loop) = @_;
    my @conns;
    # every message waiting (a few at most): one a round left those behind
    # it waiting for this worker's next round, however long its request
    my @got;
    for (1 .. 16) {
        my @more = ForkServer::HTTPServer::Handoff::take($loop->{handoff}{take}) or last;
        push @got, @more;
    }
    for my $got (@got) {
        push @conns, $self->_adopted_conn(@$got) // next;
    }
    return @conns;
}

# The first byte of a request head: its deadline, and the request's clock
# (the access log's time taken), start now.
sub _head_begins {
    my ($self, $c) = @_;
    $c->{in_head} = 1;
    $c->{started} = now();
    $c->{deadline} = $c->{started} + $self->{header_timeout};
}

sub _drop_conn {
    my ($loop, $fd) = @_;
    my $c = delete $loop->{conns}{$fd} or return;
    delete $loop->{pending}{$fd};
    delete $loop->{buffered}{$fd};
    $loop->{conns_changed} = 1;
    close $c->{sock};
    return;
}

sub _accept {
    my ($self, $listen, $stimeo) = @_;
    my $peer = accept(my $conn, $listen);
    unless ($peer) {
        return undef if $! == EINTR || $! == EAGAIN || $! == ECONNABORTED;
        # EMFILE, ENOBUFS...: transient pressure; don't spin, don't die
        $self->_log("accept: $!");
        select(undef, undef, undef, 0.1);
        return undef;
    }
    return $self->_conn($conn, $peer, $stimeo);
}

# A connection the worker holds, from accept()'s socket and peer address.
sub _conn {
    my ($self, $conn, $peer, $stimeo) = @_;
    # Per connection, not per request: no Nagle delay on split writes; no
    # single read or write stalls longer than socket_timeout.
    setsockopt($conn, IPPROTO_TCP, TCP_NODELAY, 1);
    setsockopt($conn, SOL_SOCKET, SO_RCVTIMEO, $stimeo);
    setsockopt($conn, SOL_SOCKET, SO_SNDTIMEO, $stimeo);
    return $self->_conn_from($conn, $peer);
}

# The connection's state, from its socket (options set) and peer address.
sub _conn_from {
    my ($self, $conn, $peer) = @_;
    my ($rport, $raddr) = (0, '');
    return $self->_new_conn($conn, $raddr, $rport) unless length $peer;
    my $fam = sockaddr_family($peer);
    if ($fam == AF_INET) {
        ($rport, $raddr) = unpack_sockaddr_in($peer);
        $raddr = inet_ntop(AF_INET, $raddr);
    } elsif ($fam == AF_INET6) {
        ($rport, $raddr) = unpack_sockaddr_in6($peer);
        $raddr = inet_ntop(AF_INET6, $raddr);
    }
    return $self->_new_conn($conn, $raddr, $rport);
}

sub _new_conn {
    my ($self, $conn, $raddr, $rport) = @_;
    my $c = { sock => $conn, buf => '', raddr => $raddr, rport => $rport,
              informational => sub { ForkServer::HTTPServer::Response::write_informational($conn, @_) } };
    $self->_head_begins($c);
    return $c;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Conns - the connections a worker of L<ForkServer::HTTPServer> holds

=head1 DESCRIPTION

Methods of the server object (and three functions of the worker's loop
state) used by L<ForkServer::HTTPServer::Worker>: a connection's state from
C<accept()> (C<TCP_NODELAY>, the socket time-outs) or from a sibling's
hand-over, the head and keep-alive deadlines (C<_head_begins>), the room a
new client makes at C<MAX_CONNS> (C<_make_room>: the idle connection that
waited longest goes), closing (C<_drop_conn>), and the hand-over: a worker
with siblings that starts a request gives its quiet idle connections, and
when the board says a sibling is free its connections with a request
waiting too, to the workers' queue (C<_give_idle>), takes what siblings
gave (C<_take_conns>), and marks itself free while it waits with nothing to
do (C<_mark_free>). Internal: no interface of its own.

=cut
