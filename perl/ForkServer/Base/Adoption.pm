package ForkServer::Base::Adoption;
use strict;
use warnings;

use POSIX ();
use Time::HiRes ();
use ForkServer::Base::Clone ();
use ForkServer::Process::Descriptors ();
use ForkServer::Process::Exit ();
use ForkServer::Vassal::Identity ();
use ForkServer::Log ();
use ForkServer::Base::Preloaded ();
use ForkServer::Protocol qw(MASK_ON_DEMAND);
use ForkServer::Process::Random ();
use ForkServer::Process::Startup ();
# ForkServer::Vassal: loaded by the web base (ForkServer::run_base)

=head1 NAME

ForkServer::Base::Adoption - a complete adoption request becomes a vassal

=head1 SYNOPSIS

  # methods of the base (ForkServer::Base inherits them)
  $base->adopt($request);    # a warm spare, a clone or the double fork
  # in a spare, at birth and at its adoption (ForkServer::Spares::Process):
  $base->_close_base;
  $base->_become_vassal($request, first_worker => $worker);    # does not return

=head1 DESCRIPTION

A complete request goes to a warm spare when the pool has one that fits
(L<ForkServer::Spares>). Otherwise it is served with one fork,
C<clone(CLONE_PARENT)> (L<ForkServer::Base::Clone>), when the requester is the
base's own parent (the Emperor): the vassal is born the Emperor's child,
with no intermediate process. Otherwise (another requester, not x86_64
Linux, a failed start-up check, or C<fork-server-double-fork> set) it is
served with uWSGI's double fork, and the kernel hands the grandchild to the
Emperor, a subreaper; the base reaps the intermediate child without waiting
for it.

Either way the vassal first becomes the leader of a new session
(L<ForkServer::Process::Session>: the Emperor tells its orphans by session id), then
closes everything of the base, sets C<UWSGI_EMPEROR_FD> (and
C<UWSGI_EMPEROR_FD_CONFIG>), puts the on-demand socket on descriptor 0,
replies with its pid (a clone's pid the base sends itself, right after the
clone, as it does a warm spare's: the Emperor's answer does not wait for the
new vassal's first turn on a core), then configures itself from the
received argv alone and runs L<ForkServer::Vassal> on the preloaded app.

These are methods of L<ForkServer::Base>'s object (its C<clone>,
C<spares>, C<app>, C<app_fds>, C<refuse>).

=cut

sub adopt {
    my ($self, $req) = @_;
    $self->{adopted_at} = Time::HiRes::time();    # what the vassals loaded lazily waits (ForkServer::Base::Learned)
    if (my $spares = $self->{spares}) {
        $spares->hold_off;
        if ($spares->take($req)) {
            $req->close_all;    # the spare holds them now
            return;
        }
    }
    # Only our parent gets its vassal as a direct child: anyone else asking
    # (a helper process of the Emperor, a test) gets the protocol's double
    # fork and the reparenting to the nearest subreaper.
    if ($self->{clone} && ($req->peer_pid // 0) == getppid()) {
        # Born in its own cgroup when the Emperor sent one: the Emperor has
        # nobody to move (a move waits for the kernel's RCU grace period)
        # and nothing the vassal forks can escape it. Refused by the kernel:
        # said once, and the Emperor moves it, as for any other fork server.
        # the new vassal starts at once, right where the clone returns
        my ($pid, $placed, $refused) = ForkServer::Base::Clone::clone_parent_into(
            $req->cgroup_fd, in_child => [$self, '_become_vassal', $req, base_replied => 1]);
        return $self->refuse($req, "clone: $!") unless defined $pid;
        $self->log($refused) if $refused;
        # The pid is ours to send: the Emperor's adoption slot comes free
        # now, not when the new vassal first gets a core (in a mass start,
        # behind every other one starting). Its own child from birth, the
        # Emperor reaps it whatever it does next. A requester gone already
        # is the vassal's to see (end of file on its Emperor pipe).
        eval { $req->reply_pid($pid, $placed); 1 } or $self->log("vassal pid $pid: $@");
        $req->close_all;    # the vassal holds them now
        return;
    }
    my $pid = fork;
    return $self->refuse($req, "fork: $!") unless defined $pid;
    if ($pid == 0) {
        $self->_intermediate_child($req);    # does not return
    }
    $self->{children}++;
    $req->close_all;    # the child holds them now
    return;
}

# The first child forks the vassal and exits at once: it does nothing else,
# because every page it touched would be copied for nothing (the vassal has
# to do the same work anyway, while this child's exit runs on the other core).
sub _intermediate_child {
    my ($self, $req) = @_;
    my $pid = fork;
    POSIX::_exit(defined $pid ? 0 : 1) unless defined $pid && $pid == 0;
    $self->_become_vassal($req);
}

# In a process forked from the base: let go of everything of the base's
# (a spare calls this at birth, a vassal again at adoption: idempotent).
sub _close_base {
    my ($self) = @_;
    $SIG{$_} = 'DEFAULT' for qw(TERM INT PIPE CHLD);
    close delete $self->{listen} if $self->{listen};
    close delete $self->{spare}  if $self->{spare};
    $_->close_all for values %{ $self->{clients} };
    $self->{clients} = {};
    close delete $self->{emperor}   if $self->{emperor};
    close delete $self->{config_fh} if $self->{config_fh};
    (delete $self->{learned})->close if $self->{learned};
    # the spares' links: a waiting spare must see end of file when the base goes
    (delete $self->{spares})->close_links if $self->{spares};
    return;
}

# Lose everything of the base and arrange the descriptors as the protocol
# says (PROTOCOL.md section 4, step 3).
sub _detach_from_base {
    my ($self, $req) = @_;
    $self->_close_base;
    my ($pipe_fd, $config_fd, $ondemand_fd, $cgroup_fd) = $req->fds_by_role;
    POSIX::close($cgroup_fd) if defined $cgroup_fd;    # it was for its birth only
    $ENV{UWSGI_EMPEROR_FD} = $pipe_fd;
    if (defined $config_fd) { $ENV{UWSGI_EMPEROR_FD_CONFIG} = $config_fd }
    else                    { delete $ENV{UWSGI_EMPEROR_FD_CONFIG} }
    if (defined $ondemand_fd) {
        POSIX::dup2($ondemand_fd, 0) // die "dup2 of the on-demand socket to descriptor 0: $!\n";
        POSIX::close($ondemand_fd);
    }
    $req->release_fds;
    return;
}

# The grandchild (or the clone): its pid replied, become the vassal the argv asks
# for. Its options replace the base's; the preloaded app stays in memory.
sub _become_vassal {
    my ($self, $req, %vassal) = @_;    # %vassal: first_worker (a spare's, ForkServer::Spares), base_replied
    my $base_replied = delete $vassal{base_replied};
    my (undef, @argv) = $req->argv;
    my $config_text;
    ForkServer::Process::Startup::run(
        argv    => \@argv,
        session => 1,
        prepare => sub {
            ForkServer::Process::Random::reseed();
            $self->_detach_from_base($req);
            $self->_reply_pid($req, $base_replied);
        },
        # `emperor prove`: another kind of adopted vassal, a test file; its
        # pipes are the test's stdout and stderr (ForkServer::Prove::TestFile).
        before_config => sub {
            my ($text, %pipes) = @_;
            $config_text = $text;    # a spare's first worker configures itself from it too
            return unless ($argv[0] // '') eq '--test-file';
            die "this base does not run test files\n" unless ForkServer::Prove::TestFile->can('become_test');
            ForkServer::Prove::TestFile::become_test(
                argv => \@argv, config_text => $text, stdout => $pipes{emperor}, stderr => $pipes{config_fh},
            );    # returns only on error
        },
        run => sub {
            my (%common) = @_;
            die "fork-server is set: an adopted vassal cannot be a base vassal\n"
                if defined $common{config}->get('fork-server');
            $vassal{first_worker}->for_request(\@argv, $config_text) if $vassal{first_worker};
            $self->_close_inherited($common{config}, $vassal{first_worker},
                                    grep { defined } @common{qw(emperor config_fh)});
            # its workers too: they are forked after this
            ForkServer::Process::Exit::without_global_destruction();
            ForkServer::Log::line($common{config}->name, $_) for ForkServer::Base::Preloaded::warnings();
            require ForkServer::Vassal;
            ForkServer::Vassal->new(
                %common,
                preloaded_app => $self->{app},
                use_fd0       => ($req->mask & MASK_ON_DEMAND) ? 1 : 0,
                %vassal,
            )->run;
        },
        # A plain exit: the app's END blocks run and what the vassal holds
        # is freed and flushed, but not the whole heap inherited from the
        # base (ForkServer::Process::Exit: each stopping vassal would copy the
        # codebase's pages, 50 MB for the heavy benchmark app, times the
        # fleet on a shutdown).
        # A spare's warm worker that was never given the socket (the vassal
        # failed first) goes with it rather than outliving it as an orphan.
        exit => sub { $vassal{first_worker}->discard if $vassal{first_worker}; exit $_[0] },
    );
}

=head2 early_start_fits($config) -> bool

Whether a spare's warm worker may be started before its master is set up:
not when the master must open something for it first (the requests file,
made as root for the uid the vassal drops to: L<ForkServer::Vassal>), lets
it go anyway (an app of its own, a descriptor of the base's to keep), or
fails (C<fork-server> in an adopted vassal).

=cut

sub early_start_fits {
    my ($config) = @_;
    return 0 if defined $config->get('psgi') || $config->list('keep-fd') || defined $config->get('fork-server');
    return 0 if $> == 0 && defined ForkServer::Vassal::Identity::target($config);
    return 1;
}

# Before the app runs in the vassal: nothing of the base's but stdio, its
# own pipes, what a spare's first worker needs, and the `keep-fd` ones.
sub _close_inherited {
    my ($self, $config, $worker, @pipes) = @_;
    my @keep = map { $self->_may_keep($config, $_) } $config->list('keep-fd');
    ForkServer::Process::Descriptors::close_all_but(0, 1, 2, (map { fileno $_ } @pipes),
                                           ($worker ? $worker->fds : ()), @keep);
    return;
}

# keep-fd N: one of the app's (note_app_fds), and, for a vassal that drops
# root for a uid, only a descriptor whose file that uid owns (anything else
# was opened with root's rights: its permission check is not made again).
sub _may_keep {
    my ($self, $config, $fd) = @_;
    my $what = $self->{app_fds}{$fd}
        // die "keep-fd $fd: not a descriptor the base's app holds ("
             . (join(', ', sort { $a <=> $b } keys %{ $self->{app_fds} || {} }) || 'it holds none') . ")\n";
    my $id = ForkServer::Vassal::Identity::target($config);
    if ($id && $> == 0 && $id->{uid} != 0) {
        my @st = POSIX::fstat($fd);
        my $owner = @st ? $st[4] : '?';
        die "keep-fd $fd ($what): refused for uid $id->{uid}: the base opened it as root"
            . " and it belongs to uid $owner, not to uid $id->{uid}\n"
            if $owner ne $id->{uid};
    }
    return $fd;
}

sub _reply_pid {
    my ($self, $req, $base_replied) = @_;
    # for the rest of the vassal's life, as before it was an eval's local
    $SIG{PIPE} = 'IGNORE';
    # a clone's and a spare's pid were sent by the base (ForkServer::Spares)
    $req->reply_pid($$) if $req->sock && !$base_replied;
    $req->close_all;
    return;
}

1;
