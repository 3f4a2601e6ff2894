package ForkServer::Spares::Process;
use strict;
use warnings;

use IO::Select ();
use POSIX ();
use ForkServer::Base::Priority ();
use ForkServer::Base::Request ();
use ForkServer::Link ();
use ForkServer::Log ();
use ForkServer::Process::Random ();
use ForkServer::Spares::Rehearsal ();
use ForkServer::Process::Session ();
use ForkServer::Spares::Worker ();

=head1 NAME

ForkServer::Spares::Process - a warm spare's life, from its birth to its adoption or its end

=head1 SYNOPSIS

  # in the process just made by ForkServer::Spares (clone or double fork):
  ForkServer::Spares::Process::run(base => $base, link => $link, paths => \@early_warmup,
                                   warm_timeout => $seconds);    # does not return
  ForkServer::Spares::Process::leave($status);    # a spare, or its waiting worker, ends

=head1 DESCRIPTION

A spare leads its own session (L<ForkServer::Process::Session>) from birth, so the
worker it forks is in the session the vassal will have, and lets go of
everything of the base's (L<ForkServer::Base::Adoption>'s C<_close_base>).
Until it is adopted, the Emperor knows it by its title, C<psgi-vassal NAME
(spare of BASEPID)> (C<, warming)> until its worker is warm): it is
neither an orphan nor a stranger (orphans.py), and C<emperor status>
counts it, with its worker, under its base.

At birth the spare forks its first worker (L<ForkServer::Spares::Worker>),
which runs the base's C<early-warmup> paths and L<ForkServer::Spares::Rehearsal>'s
worker part, three times (its own lazily built state and copy-on-write
faults happen then, not on the first real request), tells the spare, and
waits. The spare runs its own rehearsal, then tells the base C<R PID> and
waits on its link.

Adopted, it checks the packet again with L<ForkServer::Base::Request>
and becomes the vassal exactly as a forked one does
(L<ForkServer::Base::Adoption>'s C<_become_vassal>: its argv and config;
its session it already leads), except that its first worker already
exists: it gets the listening socket, the argv and the config text,
applies C<env>, C<chdir>, C<gid>/C<uid> itself and starts accepting
(L<ForkServer::HTTPServer/run_preforked_worker>); workers beyond the first
are forked then. Mostly the worker has started before: from the base's own
request, judging itself whether its warm-up fits the vassal
(L<ForkServer::Spares::WorkerStart>), while the spare sets itself up as
the master on the other core. A config with C<psgi> (an app on top of the base) lets the
waiting worker go and forks fresh workers from the loaded app.

End of file on the link (the base stopped or died, or a deploy replaced
it) ends a waiting spare, and its worker with it (end of file on their own
link), a warming one too. Before it is warm, a spare that fails tells the
base why (C<E PID WHY>). A vassal that fails before its warm worker got
the socket takes the worker with it; one whose worker died just before its
adoption forks fresh workers. A waiting spare whose worker dies does not
leave on its own: the base may have answered an adoption with its pid and
not yet sent it. It tells the base (C<G PID>) and waits: for the adoption,
or for the end of file the base gives a spare it has forgotten. Signals
the app handles (inherited by spares and their workers) interrupt no wait.

=cut

use constant WORKER_GONE => 'G';    # spare to base: forget me, unless my pid is already given
use constant DIRECT      => 'D';    # base to spare, before the packet: its warm worker was sent the request too
# base to spare, before the packet: its warm worker was sent the request and
# the requester, and replies with the pid of the process that serves (its
# own when it becomes a `master = false` vassal itself)
use constant WORKER_REPLIES => 'O';

our ($NAME, $BASE_PID);

=head2 run(base => $base, link => $link, paths => \@paths, warm_timeout => $seconds)

The spare, in the process just made: warms up, waits, and becomes the
vassal it is given. Does not return.

=cut

sub run {
    my (%args) = @_;
    my ($base, $link) = @args{qw(base link)};
    my $name = $base->{name};
    ForkServer::Process::Random::reseed();
    # Its own session first, as every vassal process: its first worker is
    # forked below and must be in the session the vassal will have.
    my ($leads, $why) = ForkServer::Process::Session::lead();
    ForkServer::Log::line($name, "spare pid $$ is not a session leader ($why)") unless $leads;
    # Born the Emperor's child (clone): when it dies, so does the spare,
    # and what its worker's warm-up started (leave()).
    if ($base->{clone}) {
        $SIG{TERM} = sub { leave(0) };
        leave(0) unless ForkServer::Process::Session::die_with_parent(POSIX::SIGTERM(), $base->{parent});
    }
    my $warm;
    my $ok = eval {
        $base->_close_base;    # and the other spares' links, with the pool
        # The Emperor tells a spare from a stranger by this title (orphans.py)
        $0 = "psgi-vassal $name (spare of $base->{pid}, warming)";
        my $worker = ForkServer::Spares::Worker->prefork($base->{app}, $args{paths}, $name, $link,
                                                         $args{warm_timeout});
        ForkServer::Spares::Rehearsal::vassal_start() for 1 .. ForkServer::Spares::Rehearsal::TIMES;
        # warm: the adoption's path runs ahead of the fleet, as the base does
        # (its worker raised itself too); its master puts it back once set up
        ForkServer::Base::Priority::raise_group(ForkServer::Base::Priority::raised());
        $0 = "psgi-vassal $name (spare of $base->{pid})";
        ($NAME, $BASE_PID) = ($name, $base->{pid});    # for its title if it leaves (_wait_for_adoption)
        # with the worker's own link, on which the base sends it the adoption too
        ForkServer::Link::send_fds($link, "R$$", $worker->link_for_base) or die "telling the base: $!\n";
        $worker->forget_link_for_base;
        $warm = 1;
        my $req = _wait_for_adoption($link, $worker);
        close $link;
        # a vassal now: it stops as every vassal does
        ForkServer::Process::Session::die_with_parent(0) if $base->{clone};
        $SIG{TERM} = 'DEFAULT';
        $base->_become_vassal($req, first_worker => $worker->{gone} ? undef : $worker);    # does not return
        1;
    };
    # before it is warm, the base says why, in its one line for the failure
    if (!$ok && !($warm || !$link->opened || ForkServer::Link::send_fds($link, "E$$ " . substr($@, 0, 2000)))) {
        ForkServer::Log::line($name, "spare pid $$: $@");
    }
    leave($ok ? 0 : 1);
}

=head2 leave($status)

A spare that ends without an adoption (its base gone or replaced, its
worker gone, its warm-up failed) takes its session with it: its worker
and whatever the app started in the warm-up (ForkServer::Process::Session). The
Emperor leaves a spare's session alone: only the spare knows it is over.

=cut

sub leave {
    my ($status) = @_;
    $SIG{TERM} = 'IGNORE';
    ForkServer::Process::Session::end_others(leader_only => 1, grace => 1);
    POSIX::_exit($status);
}

# Blocks until the base hands over an adoption; exits quietly on end of file
# (the base is gone or let us go) or when the waiting worker is gone. An
# adoption the base has already answered with our pid is served even if the
# worker has just died: the vassal forks fresh workers.
# The base may have closed its end already (the adoption sent): no SIGPIPE.
sub tell_worker_gone {
    my ($link) = @_;
    local $SIG{PIPE} = 'IGNORE';
    syswrite($link, WORKER_GONE . $$);
    return;
}

sub _wait_for_adoption {
    my ($link, $worker) = @_;
    my $select = IO::Select->new($link, $worker->{link});
    my @ready;
    while (1) {
        @ready = $select->can_read;
        next unless @ready;    # a signal the app handles
        last if grep { $_ == $link } @ready;
        last unless $worker->answered;
        # its answer to the base's request, sent to it first: ours follows
        $select->remove($worker->{link});
    }
    if ((grep { $_ == $worker->{link} } @ready) && !$worker->answered) {
        $worker->discard;
        $worker->{gone} = 1;
        # The base replies with our pid before it sends the adoption: one not
        # here yet may be on its way. Only the base knows; it answers with
        # the adoption, or by closing the link once it has forgotten us.
        tell_worker_gone($link) unless grep { $_ == $link } @ready;
    }
    my ($data, @fds) = ForkServer::Link::recv_fds($link);
    leave(0) unless defined $data && @fds;    # the base forgot us, or is gone
    my $direct = $data =~ s/\A(?:${\DIRECT}|${\WORKER_REPLIES})//;
    @fds = $worker->renumber(length $data > 3 ? ord substr($data, 3, 1) : 0, @fds);    # modifier2: the mask
    # The worker has the request from the base too and starts on its own:
    # this spare waits for its answer before it does anything, so that the
    # worker's start-up has the CPU to itself (this spare's own comes after)
    if ($direct && !$worker->{gone}) {
        $worker->sent_directly;
        $worker->await_direct;
        # The worker is the vassal (`master = false`): it said so before its
        # pid reply, and leads its own session. This spare leaves, holding
        # nothing, and does not end the session's other processes: they
        # are what the worker's warm-up started.
        # Its exit (the unmapping of an address space as large as the base's)
        # waits until the vassal's first request is served, and then runs
        # at the lowest priority.
        if ($worker->is_the_vassal) {
            POSIX::close($_) for @fds;
            $0 = "psgi-vassal $NAME (spare of $BASE_PID, leaving)";
            ForkServer::Base::Priority::back(undef);
            POSIX::nice(19);
            1 while !defined sysread($worker->{link}, my $word, 1) && $!{EINTR};    # its word, or its end
            POSIX::_exit(0);
        }
    }
    # The base's priority is for a worker serving straight from the base's
    # request (its master puts it back once set up). Any other start (an
    # app of its own to load, a uid to drop to, fresh workers) runs as any
    # vassal's does.
    ForkServer::Base::Priority::back($worker->{gone} ? undef : $worker->{pid}) unless $worker->serves_early;
    # no connection to the requester: the base sent the pid reply
    my $req = eval { ForkServer::Base::Request->handed_over(sock => undef, data => $data, fds => \@fds) };
    if (!$req) {
        POSIX::close($_) for @fds;
        die "the request from the base: $@";
    }
    return $req;
}

1;
