package ForkServer::Spares::Worker;
use strict;
use warnings;

use IO::Select ();
use POSIX ();
use Time::HiRes ();
use Socket qw(AF_UNIX SOCK_SEQPACKET PF_UNSPEC MSG_PEEK MSG_DONTWAIT);
use Cwd ();
use ForkServer::Config ();
use ForkServer::Process::Descriptors ();
use ForkServer::HTTPServer ();
use ForkServer::HTTPServer::Handoff ();
use ForkServer::Vassal::Identity ();
use ForkServer::Link ();
use ForkServer::Log ();
use ForkServer::Protocol qw(encode_array decode_array MASK_CONFIG);
use ForkServer::Process::Random ();
use ForkServer::Process::Session ();
use ForkServer::Spares::Rehearsal ();
use ForkServer::Spares::EnvReads ();
use ForkServer::Spares::Fit ();
use ForkServer::Spares::WorkerStart ();
use ForkServer::Spares::Solo ();
use ForkServer::Vassal ();
use ForkServer::Base::Priority ();
use ForkServer::Base::Warmup ();

=head1 NAME

ForkServer::Spares::Worker - a spare's first worker, forked and warmed before any adoption

=head1 SYNOPSIS

  # in a spare (ForkServer::Spares), before it tells the base it is ready:
  my $worker = ForkServer::Spares::Worker->prefork($app, \@paths, $name, $base_link, $timeout);
  # adopted: the argv and config text, then the socket (ForkServer::Vassal)
  $worker->for_request(\@argv, $config_text);
  # started by the base's request, it judged itself (ForkServer::Spares::WorkerStart):
  my $why = $worker->started_early ? $worker->verdict : $worker->unfit($config);   # undef if it fits
  my $preforked = $worker->start($listen_sock, $requests_fh);   # ForkServer::HTTPServer's slot 1
  $worker->discard;    # or: the vassal's own app (psgi); fresh workers instead

=head1 DESCRIPTION

The worker is forked with the pipes ForkServer::HTTPServer's master uses
with its workers (worker messages, stop pipe), runs the base's
C<early-warmup> paths and L<ForkServer::Spares::Rehearsal>'s worker part three
times, says C<W> and waits on its link. Given its vassal's argv, config
text, listening socket and standard output and error, it applies C<env>,
C<chdir> and C<gid>/C<uid> itself and serves as the master's slot 1
(L<ForkServer::HTTPServer/run_preforked_worker>).

=cut

use constant READS_MAX => 65536;    # the W message with the names of the %ENV keys the warm-up read
# how the worker is started (ForkServer::Spares::WorkerStart): its master
# judged it fit (GO), or it judged itself and answered FITS or UNFIT
use constant { map { $_ => ForkServer::Spares::WorkerStart->can($_)->() } qw(GO FITS UNFIT) };

# In the spare: fork the worker with the master's pipes (ForkServer::HTTPServer's
# worker messages and stop pipe); it warms up, says so, and waits for go().
sub prefork {
    my ($class, $app, $paths, $name, $base_link, $timeout) = @_;    # the spare's link to the base: not the worker's
    pipe(my $ready_r, my $ready_w) or die "pipe: $!\n";
    pipe(my $stop_r, my $stop_w) or die "pipe: $!\n";
    socketpair(my $ours, my $theirs, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die "socketpair: $!\n";
    # the worker's own link with the base (ForkServer::Spares::WorkerStart): the
    # spare passes the base its end once warm
    socketpair(my $for_base, my $direct, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die "socketpair: $!\n";
    # the numbers the vassal's Emperor pipe and config pipe will have in the
    # spare (renumber): the worker knows its UWSGI_EMPEROR_FD and
    # UWSGI_EMPEROR_FD_CONFIG without asking
    my @reserved = POSIX::pipe() or die "pipe: $!\n";    # placeholders: nothing shared with the base
    my $handoff = ForkServer::HTTPServer::Handoff::pair();
    my $pid = fork // die "fork: $!\n";
    if ($pid == 0) {
        $SIG{TERM} = 'DEFAULT';    # the spare's own (ForkServer::Spares::Process::leave) is not the worker's
        ForkServer::Process::Random::reseed();
        close $ours;
        close $for_base;
        POSIX::close($_) for @reserved;    # the spare's placeholders (numbers only, here)
        close $base_link;
        close $stop_w;    # the master's: end of file on it is the worker's stop
        # the app runs here: nothing of the base's (ForkServer::Process::Descriptors)
        ForkServer::Process::Descriptors::close_all_but(0, 1, 2, map { fileno $_ } $theirs, $direct, $ready_r, $ready_w,
                                                   $stop_r, values %$handoff);
        my $ok = eval { _worker_main($theirs, [$direct, @reserved], $app, $paths, $name, $ready_r, $ready_w, $stop_r, $handoff); 1 };
        ForkServer::Log::line($name, "spare worker pid $$: $@") unless $ok;
        STDOUT->flush;
        STDERR->flush;
        POSIX::_exit($ok ? 0 : 1);
    }
    close $theirs;
    close $direct;
    my $self = bless {
        pid => $pid, link => $ours, for_base => $for_base, reserved => \@reserved,
        pipes => { ready_r => $ready_r, ready_w => $ready_w, stop_r => $stop_r, stop_w => $stop_w,
                   handoff_take => $handoff->{take}, handoff_give => $handoff->{give},
                   handoff_desk => $handoff->{desk}, handoff_counts => $handoff->{counts} },
    }, $class;
    # warm before the base counts on us; an app whose warm-up path hangs in
    # a forked process must not hold the pool (nor this process) forever
    # (the base sends nothing before we are warm: its link readable is its end)
    my $select = IO::Select->new($ours, $base_link);
    my $deadline = Time::HiRes::time() + $timeout;
    my @ready;
    while (!@ready) {    # a signal the app handles interrupts select(): no time-out
        my $left = $deadline - Time::HiRes::time();
        last if $left <= 0;
        @ready = $select->can_read($left);
    }
    if (!@ready || grep { $_ == $base_link } @ready) {
        kill 'KILL', $pid;
        waitpid $pid, 0;
        ForkServer::Spares::Process::leave(0) if @ready;    # the base is gone: nobody to tell
        die "its worker was still warming up after $timeout s (fork-server-spare-timeout): killed\n";
    }
    my $n = sysread $ours, my $msg, READS_MAX;
    if ($n && $msg =~ /\AW/) {
        my (undef, @read) = split /\0/, $msg, -1;
        $self->{warm} = {
            id  => ForkServer::Vassal::Identity::current(),
            cwd => Cwd::getcwd(),
            env => { map { $_ => $ENV{$_} } (grep { $_ eq '*' } @read) ? keys %ENV : @read },
        };
        return $self;
    }
    waitpid $pid, 0;
    die "its worker " . _status($?) . " while warming up\n";
}

sub _status { $_[0] & 127 ? "was killed by signal " . ($_[0] & 127) : "exited with status " . ($_[0] >> 8) }

=head2 link_for_base() / forget_link_for_base(), renumber($mask, @fds), sent_directly(), await_direct(), answered()

The worker's own link, for the spare to pass to the base when warm, then
let go of. C<renumber>: the request's Emperor pipe and config pipe onto
the descriptor numbers reserved for them at prefork, which the worker knows
(its C<UWSGI_EMPEROR_FD> and C<UWSGI_EMPEROR_FD_CONFIG>). With a request
the base sent the worker too (L<ForkServer::Spares::WorkerStart>,
C<sent_directly>): C<await_direct>, before the spare reads its request and
config pipe, reads the worker's answer: started and fits (C<verdict>
undef), started and leaves (C<verdict> why), not started (the spare starts
it as before), or gone; the socket it bound (C<bound_fd>) when the request
had none. C<answered>: whether the worker has said something rather than
left, without reading it.

=cut

sub link_for_base        { return fileno $_[0]{for_base} }
sub forget_link_for_base { close delete $_[0]{for_base} if $_[0]{for_base}; return }

sub sent_directly { $_[0]{direct} = 1; return }
sub bound_fd      { return $_[0]{bound_fd} }

# The request's Emperor pipe and config pipe onto the numbers reserved at
# prefork (the placeholders give way); the descriptors in protocol order.
sub renumber {
    my ($self, $mask, @fds) = @_;
    my ($pipe_slot, $config_slot) = @{ delete $self->{reserved} || [] };
    return @fds unless defined $pipe_slot;
    my @to = ($pipe_slot, ($mask & MASK_CONFIG) ? $config_slot : ());
    POSIX::close($config_slot) unless $mask & MASK_CONFIG;
    for my $i (0 .. $#to) {
        next unless defined $fds[$i];
        POSIX::dup2($fds[$i], $to[$i]) // die "dup2 of the request's descriptor to $to[$i]: $!\n";
        POSIX::close($fds[$i]);
        $fds[$i] = $to[$i];
    }
    return @fds;
}

sub await_direct {
    my ($self) = @_;
    return unless delete $self->{direct};
    my ($said, $bound) = ForkServer::Link::recv_fds($self->{link});    # the socket it bound, with S
    my $n = defined $said ? length $said : 0;
    return if $n && $said eq ForkServer::Spares::WorkerStart::NOT_STARTED;
    $self->{bound_fd} = $bound;
    $self->{early} = 1;
    if ($n && $said eq ForkServer::Spares::WorkerStart::IS_THE_VASSAL) {
        $self->{vassal} = 1;
        return;
    }
    $self->{said} = !$n ? 'its worker is gone'
                  : $said =~ /\A\Q${\UNFIT}\E/ ? substr($said, 1) || 'unfit'
                  : undef;
    return;
}

=head2 is_the_vassal() -> bool

Whether the worker, given the requester with the base's request, became
the vassal itself (C<master = false>: L<ForkServer::Spares::WorkerStart>).

=cut

sub is_the_vassal { return $_[0]{vassal} ? 1 : 0 }

sub answered {
    my ($self) = @_;
    my $got = recv($self->{link}, my $byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return defined $got && length $byte ? 1 : 0;
}

sub for_request {
    my ($self, $argv, $config_text) = @_;
    @$self{qw(argv config_text)} = ($argv, $config_text);
    return $self;
}

=head2 unfit($config) -> $why or undef

Whether this worker may serve the vassal the config describes
(L<ForkServer::Spares::Fit>): called in the adopted spare once C<env> and
C<chdir> are applied. The reason when not.

=cut

sub unfit {
    my ($self, $config) = @_;
    return ForkServer::Spares::Fit::unfit_for($self->{warm}, $config);
}

=head2 start($listen_sock) -> \%preforked

In the adopted spare, once its socket exists: the worker gets it with the
argv and config text, and the vassal's standard output and error (the
worker was forked with the base's: ForkServer::Vassal::Output gave the vassal its
own since). Returns what L<ForkServer::HTTPServer> needs to take the
worker as its slot 1.

=cut

sub start {
    my ($self, $sock, $requests_fh) = @_;
    # set up: the vassal runs as any other from now on
    ForkServer::Base::Priority::back($self->{pid});
    return $self->_started if $self->{early};    # it has the socket, and said it fits
    $self->_send(GO, fileno $sock, $requests_fh ? fileno $requests_fh : ());
    close $self->{link};
    return $self->_started;
}

sub _started { $_[0]{started} = 1; return { pid => $_[0]{pid}, %{ $_[0]{pipes} } } }

# What the worker is given: how it starts, the config text, the vassal's
# protocol variables (as its other workers inherit them), the argv; the
# listening socket, standard output and error, the requests file.
sub _send {
    my ($self, $mode, $listen_fd, @more) = @_;
    my $text = $self->{config_text};
    my @emperor = map { $ENV{$_} // '' } qw(UWSGI_EMPEROR_FD UWSGI_EMPEROR_FD_CONFIG);
    my $data = encode_array($mode, defined $text ? (1, $text) : (0, ''), @emperor, @{ $self->{argv} });
    STDOUT->flush;
    STDERR->flush;
    ForkServer::Link::send_fds($self->{link}, $data, $listen_fd, 1, 2, @more)
        or die "starting the spare's worker: $!\n";
    return;
}

=head2 started_early() -> bool

Whether the worker started from the base's request (C<await_direct>): it
judged itself, C<verdict> says how.

=cut

sub started_early { return $_[0]{early} ? 1 : 0 }

=head2 serves_early() -> bool

Whether it started from the base's request and said it fits (before
C<verdict> is read).

=cut

sub serves_early { return $_[0]{early} && !defined $_[0]{said} ? 1 : 0 }

=head2 verdict() -> $why or undef

When C<started_early>: undef when the worker fits and serves (C<start>
then hands it to the master), else why not (it has left, or leaves).

=cut

sub verdict {
    my ($self) = @_;
    my $why = delete $self->{said};    # its answer (await_direct)
    close $self->{link} unless defined $why;
    return $why;
}

# What the vassal keeps open for it (ForkServer::Base closes the rest).
sub fds {
    my ($self) = @_;
    return () if $self->{started} || $self->{discarded};
    return (map({ fileno $_ } grep { $_->opened } $self->{link}, values %{ $self->{pipes} }),
            grep { defined } $self->{bound_fd});    # the socket it bound (await_direct)
}

# The config asks for something else than the preloaded app: the waiting
# worker goes (end of file on its link) and the master forks fresh ones.
sub discard {
    my ($self) = @_;
    return if $self->{started} || $self->{discarded}++;
    ForkServer::Base::Priority::back(undef);
    # said, not left to the link's end of file: a helper the vassal's app
    # forked while loading holds a copy of the link, and the worker would
    # wait for that end forever (and the vassal with it)
    local $SIG{PIPE} = 'IGNORE';
    syswrite $self->{link}, 'G';
    close $self->{link};
    close $_ for values %{ $self->{pipes} };
    # It leaves within a millisecond or two of the 'G': look again after 1
    # ms, doubling to 0.1 s (a fixed 0.1 s poll put 0.1 s on every adoption
    # whose config does not fit the warm-up); after 10 s it is killed:
    # nothing waits on it unbounded.
    my ($pause, $waited) = (0.001, 0);
    while ($waited < 10) {
        return if waitpid($self->{pid}, POSIX::WNOHANG()) != 0;
        select undef, undef, undef, $pause;
        $waited += $pause;
        $pause = $pause * 2 > 0.1 ? 0.1 : $pause * 2;
    }
    kill 'KILL', $self->{pid};
    waitpid $self->{pid}, 0;
    return;
}

sub _worker_main {
    my ($link, $direct_and_reserved, $app, $paths, $name, $ready_r, $ready_w, $stop_r, $handoff) = @_;
    my $master = getppid();
    $0 = "psgi-vassal $name (spare worker)";
    # what the spare's record of this warm-up says (prefork): as the spare
    # saw them, before the warm-up could change anything
    my %env_before = %ENV;
    my ($id, $cwd) = (ForkServer::Vassal::Identity::current(), Cwd::getcwd());
    # the app's paths as often as the server's: the adopted vassal's first
    # request then takes what the app's steady state takes
    my $read = ForkServer::Spares::EnvReads::during(sub {
        for (1 .. ForkServer::Spares::Rehearsal::TIMES) {
            ForkServer::Base::Warmup::run($app, $paths, sub { }) if @$paths;
            ForkServer::Spares::Rehearsal::worker_start();
        }
    });
    # what the warm-up read of %ENV: a vassal whose env differs there takes fresh workers
    my $msg = join "\0", 'W', @$read;
    $msg = "W\0*" if length $msg > READS_MAX;
    my $warm = { id => $id, cwd => $cwd,
                 env => { map { $_ => $env_before{$_} } $msg eq "W\0*" ? keys %env_before : @$read },
                 # as they are after the warm-up (it may have changed them):
                 # what the judgement compares unless the config changes them
                 now => { id => ForkServer::Vassal::Identity::current(), cwd => Cwd::getcwd() },
                 # as a master = false vassal, it leads a session of its own
                 group_raisable => ForkServer::Base::Priority::raised()
                                   && ForkServer::Base::Priority::group_raisable() };
    # warm: ahead of its own master, which sets itself up while this
    # worker starts serving (ForkServer::Base::Priority)
    ForkServer::Base::Priority::raise_process(ForkServer::Base::Priority::raised());
    syswrite($link, $msg) or die "telling the spare: $!\n";
    # the adoption comes from the base itself (ForkServer::Spares::WorkerStart)
    # or, when this worker cannot start on its own, from the spare
    my ($direct, @reserved) = @$direct_and_reserved;
    my $start = ForkServer::Spares::WorkerStart::wait_for_start(
        link => $link, direct => $direct, warm => $warm, master => $master, reserved => \@reserved);
    my ($sock, $vassal, $requests_fd) = @$start{qw(sock vassal requests_fd)};
    if ($start->{solo}) {    # the vassal itself: nothing of its spare's stays (its link, until it is told to leave)
        close $_ for $ready_r, $ready_w, $stop_r, values %$handoff;
        ForkServer::Spares::Solo::serve(app => $app, spare_link => $link, %$start);    # does not return
    }
    my $access_log = $vassal->access_log;    # opened as whoever may open it
    $vassal->drop_privileges;
    my @requests;
    if (defined $requests_fd) {
        open(my $fh, '+<&=', $requests_fd) or die "the requests file: $!\n";
        @requests = (requests_fh => $fh);
    }
    my $server = ForkServer::HTTPServer->new(listen_sock => $sock, app => $app, $vassal->server_args($access_log),
                                             @requests);
    ForkServer::Link::send_fds($link, FITS, $start->{bound} ? fileno $sock : ()) or die "telling the spare: $!\n"
        if $start->{judged};    # WorkerStart::judge
    close $link;
    $server->run_preforked_worker(slot => 1, master_pid => $master, ready_r => $ready_r, ready_w => $ready_w,
                                  stop_r => $stop_r, handoff => $handoff);
    return;    # not reached
}

1;
