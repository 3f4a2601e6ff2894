package ForkServer::Spares::WorkerStart;
use strict;
use warnings;

use IO::Select ();
use POSIX ();
use Socket qw(SOL_SOCKET SCM_RIGHTS MSG_PEEK MSG_DONTWAIT MSG_NOSIGNAL);
use Socket::MsgHdr ();
use ForkServer::Base::Adoption ();
use ForkServer::Base::Request ();
use ForkServer::Config ();
use ForkServer::Link ();
use ForkServer::Process::Session ();
use ForkServer::Base::Priority ();
use ForkServer::Log ();
use ForkServer::Spares::Fit ();
use ForkServer::Protocol qw(decode_array decode_header encode_packet encode_dict MODIFIER1_CONFIG
                          MODIFIER1_FORK_SERVER MASK_ON_DEMAND);
use ForkServer::Vassal ();

=head1 NAME

ForkServer::Spares::WorkerStart - how a spare's waiting worker becomes its vassal's first worker

=head1 SYNOPSIS

  # in the spare's worker, warm (ForkServer::Spares::Worker):
  my $start = ForkServer::Spares::WorkerStart::wait_for_start(
      link => $spare_link, direct => $base_link, warm => \%warm_up_record, master => $spare_pid,
      reserved => [$emperor_fd, $config_fd]);
  # { sock => $listening, vassal => ForkServer::Vassal, requests_fd => $fd or undef, judged => bool }
  # judged: it started from the base's request, judged itself and must say so (FITS)

=head1 DESCRIPTION

The waiting worker holds two links: one with its spare, and its own with
the base (the spare passed the base its end when it told the base it was
warm). The base sends an adoption to both (L<ForkServer::Spares/take>),
the worker's first.

From the base's request the worker starts by itself, without waiting for
its master: it waits for the config packet in the config pipe (when the
request has one), peeks at that packet (C<MSG_PEEK>: it stays
for the master to read, with the vassal's output pipe), reads the argv and
config as the master will, takes the output, applies C<env>, C<chdir> and
the title, judges whether its warm-up fits the vassal
(L<ForkServer::Spares::Worker/unfit>), tells its master (C<S>, or C<U> and
why, then it leaves), and accepts, without a word from its master. A
request without a socket (the vassal binds its own C<http-socket>) is
bound by the worker, as the master would, and the socket goes to the
master with the C<S>. The
descriptor numbers its Emperor variables name were reserved when it was
forked (L<ForkServer::Spares::Worker/renumber>). The master reads its config pipe only after that
answer (L<ForkServer::Spares::Worker/await_direct>). Where it cannot
(the config packet not whole, an app of its own, a C<keep-fd>, a requests
file its master must make as root, a socket it cannot bind), it says C<N>
and waits for its spare to start it: once the master is set up and has
judged it (L<ForkServer::Spares::Worker/start>), with the socket, the
vassal's output and config.

=cut

use constant {
    NOT_STARTED       => 'N',    # worker to spare: the spare starts it (ForkServer::Spares::Worker::start)
    REPLY_IS_YOURS    => 'R',    # base to worker, before the packet: the requester comes last, the pid reply is the worker's
    IS_THE_VASSAL     => 'V',    # worker to spare: it is the vassal (master = false); the spare leaves
    GO                => 'go',
    FITS              => 'S',
    UNFIT             => 'U',
    CONTROL_LEN       => 64,
};

=head2 wait_for_start(link => $fh, direct => $fh, warm => \%record, master => $pid, reserved => \@fds) -> \%start

Blocks until the worker is started, from the base's request or by its
spare; leaves (exit) when the spare ends first.

=cut

sub wait_for_start {
    my (%a) = @_;
    my ($link, $direct) = @a{qw(link direct)};
    while (1) {
        my @ready = IO::Select->new(grep { defined } $link, $direct)->can_read;
        next unless @ready;    # a signal the app handles
        # the base's request first: the spare's own message (if any) follows it
        if ($direct && grep { $_ == $direct } @ready) {
            my ($data, @fds) = ForkServer::Link::recv_fds($direct);
            close $direct;    # one adoption, or the base let go of this spare
            undef $direct;
            next unless defined $data;
            my $started = _from_base($link, $a{warm}, $a{reserved}, $data, \@fds, $a{master});
            return $started if $started;
            next;
        }
        my ($data, @fds) = ForkServer::Link::recv_fds($link);
        close $direct if $direct;
        return _from_spare($link, $a{warm}, $a{master}, $data, @fds);
    }
}

# The base's adoption request: started by itself (\%start), or told the
# spare it could not (undef) and closed what it was given.
sub _from_base {
    my ($link, $warm, $reserved, $data, $fds, $spare_pid) = @_;
    my @fds = @$fds;
    my $output;
    # the requester, when the pid reply is ours to send: our own pid if we
    # become the vassal (master = false), else our spare's, as soon as we
    # know (the requester waits for it)
    my $requester = $data =~ s/\A${\REPLY_IS_YOURS}// ? pop @fds : undef;
    my $reply = sub {
        my ($pid) = @_;
        return unless defined $requester;
        reply_pid($requester, $pid);
        undef $requester;
    };
    my $not = sub {
        $reply->($spare_pid);
        POSIX::close($_) for grep { defined } @fds, $output;
        local $SIG{PIPE} = 'IGNORE';
        syswrite $link, NOT_STARTED;
        return undef;
    };
    my $req = eval { ForkServer::Base::Request->from_base(data => $data, fds => \@fds) } or return $not->();
    my ($pipe, $config_fd, $listen_fd) = $req->fds_by_role;
    my $text;
    if (defined $config_fd) {
        # the Emperor writes the config right after its request: wait for
        # it (the spare reads it only after this worker's answer), or for
        # the spare's end
        my @ready;
        @ready = IO::Select->new($link, $config_fd)->can_read until @ready;
        return $not->() if grep { $_ == $link } @ready;
        ($text, $output) = peek_config($config_fd);
        return $not->() unless defined $text;
    }
    my (undef, @argv) = $req->argv;
    my $config = eval { ForkServer::Config->from_argv(\@argv, config_text => $text) };
    return $not->() unless $config && ForkServer::Base::Adoption::early_start_fits($config);
    # no master: this worker may be the vassal itself, if its warm-up fits
    my $solo = defined $requester && !$config->get('master') && $config->get('processes') == 1;
    $reply->($spare_pid) unless $solo;
    # the Emperor pipe and the config pipe are the master's alone (or ours,
    # as the vassal)
    POSIX::close($_) for grep { defined } $solo ? () : ($pipe, $config_fd);
    STDOUT->flush;
    STDERR->flush;
    if (defined $output) {    # the vassal's output from now on, not the base's
        POSIX::dup2($output, $_) // die "dup2 of the vassal's output to descriptor $_: $!\n" for 1, 2;
        POSIX::close($output);
    }
    my $vassal = ForkServer::Vassal->new(config => $config);
    $vassal->configure;
    if ($solo && defined(my $why = ForkServer::Spares::Fit::unfit_for($warm, $config, solo => 1))) {
        # the spare's own process serves, with none of this warm-up's state
        $reply->($spare_pid);
        local $SIG{PIPE} = 'IGNORE';
        syswrite $link, UNFIT . $why;
        POSIX::_exit(0);
    }
    judge($link, $warm, $config) unless $solo;
    # No socket in the request: the vassal's own http-socket (or socket),
    # bound here as its master would, and given to the master with the
    # answer (ForkServer::Spares::Worker::await_direct). One that cannot be
    # bound: the master tries, and says why.
    my $sock = defined $listen_fd ? ForkServer::Vassal::listener_from_fd($listen_fd) : eval { $vassal->listen_socket };
    if (!$sock) {
        @fds = grep { defined } $listen_fd, $solo ? ($pipe, $config_fd) : ();    # the master's pipes are closed already
        return $not->();
    }
    if ($solo) {
        # the spare first: it must not serve once the requester has our pid
        # (it leaves when told to: ForkServer::Spares::Solo)
        syswrite($link, IS_THE_VASSAL) or die "telling the spare: $!\n";
        $reply->($$);
        # the vassal's own session, as every vassal process leads one (the
        # Emperor tells its orphans by it)
        my ($leads, $why) = ForkServer::Process::Session::lead();
        ForkServer::Log::line($config->name, "not a session leader ($why): the Emperor cannot tell its orphans")
            unless $leads;
        # a new session is a new scheduling group, at nice 0: raised as the
        # spare's was, until the first request is served (ForkServer::Spares::Solo)
        ForkServer::Base::Priority::raise_led_group(ForkServer::Base::Priority::raised()) if $warm->{group_raisable};
        set_emperor_variables($pipe, defined $config_fd ? $config_fd : '');
        return { solo => 1, sock => $sock, vassal => $vassal, config => $config,
                 on_demand => ($req->mask & MASK_ON_DEMAND) ? 1 : 0 };
    }
    # the numbers the spare gives these pipes (ForkServer::Spares::Worker::renumber)
    set_emperor_variables($reserved->[0], defined $config_fd ? $reserved->[1] : '');
    return { sock => $sock, vassal => $vassal, requests_fd => undef, judged => 1, bound => !defined $listen_fd };
}

=head2 reply_pid($fd, $pid)

The pid reply to the requester on its connection C<$fd>, which is closed
then. A requester gone already is the vassal's to see (end of file on its
Emperor pipe), as for a clone.

=cut

sub reply_pid {
    my ($fd, $pid) = @_;
    open(my $sock, '+<&=', $fd) or return POSIX::close($fd);
    send($sock, encode_packet(MODIFIER1_FORK_SERVER, 0, encode_dict(pid => $pid)), MSG_NOSIGNAL);
    close $sock;
    return;
}

=head2 peek_config($fd) -> ($text, $output_fd) or ()

The config packet waiting in the config pipe C<$fd>, read with C<MSG_PEEK>
(it stays there), with the output pipe the Emperor sent with it (a new
descriptor, or undef); the empty list when the whole packet is not there.

=cut

sub peek_config {
    my ($fd) = @_;
    open(my $fh, '+<&', $fd) or return;    # a copy: the caller's descriptor stays its own
    my @got = _peek_config($fh);
    close $fh;
    return @got;
}

sub _peek_config {
    my ($fh) = @_;
    my $head = Socket::MsgHdr->new(buflen => 4, controllen => CONTROL_LEN);
    my $n = Socket::MsgHdr::recvmsg($fh, $head, MSG_PEEK | MSG_DONTWAIT | ForkServer::Link::MSG_CMSG_CLOEXEC());
    return unless $n && $n == 4;
    my @fds;
    my @cmsg = $head->cmsghdr;
    while (my ($level, $type, $bytes) = splice @cmsg, 0, 3) {
        push @fds, unpack 'i*', $bytes if $level == SOL_SOCKET && $type == SCM_RIGHTS;
    }
    my $output = shift @fds;
    POSIX::close($_) for @fds;
    my ($mod1, $size) = eval { decode_header($head->buf) };
    my $whole = Socket::MsgHdr->new(buflen => 4 + ($size // 0));
    my $m = defined $mod1 && $mod1 == MODIFIER1_CONFIG
        ? Socket::MsgHdr::recvmsg($fh, $whole, MSG_PEEK | MSG_DONTWAIT) : undef;
    if (!($m && $m == 4 + $size)) {
        POSIX::close($output) if defined $output;
        return;
    }
    return (substr($whole->buf, 4), $output);
}

# The spare's start (or its end of file): the listening socket, the
# vassal's output, config text and Emperor variables; its master judged it.
sub _from_spare {
    my ($link, $warm, $master, $data, $fd, @output) = @_;
    my $requests_fd = $output[2];    # the vassal's requests file, when it drops root (ForkServer::Vassal)
    if (!(defined $data && defined $fd)) {    # not adopted: the spare ended
        # killed, it could not take the warm-up's helpers with it
        ForkServer::Process::Session::end_others(grace => 1) if getppid() != $master;
        POSIX::_exit(0);
    }
    STDOUT->flush;
    STDERR->flush;
    for my $to (1, 2) {    # the vassal's output from now on, not the base's
        my $from = shift @output // next;
        POSIX::dup2($from, $to) // die "dup2 of the vassal's output to descriptor $to: $!\n";
        POSIX::close($from);
    }
    my (undef, $has_text, $text, $emperor_fd, $config_fd, @argv) = decode_array($data);    # GO
    set_emperor_variables($emperor_fd, $config_fd);
    my $sock = ForkServer::Vassal::listener_from_fd($fd) or die "the listening socket: $!\n";
    my $config = ForkServer::Config->from_argv(\@argv, config_text => $has_text ? $text : undef);
    my $vassal = ForkServer::Vassal->new(config => $config);
    $vassal->configure;
    return { sock => $sock, vassal => $vassal, requests_fd => $requests_fd, judged => 0 };
}

=head2 judge($link, \%warm, $config)

Leaves after telling the spare why the worker does not fit the vassal
(C<U>). One that fits says so (C<S>, C<judged> in the start) once its
server is made, just before it accepts: its spare waits for that word
before its own start-up.

=cut

sub judge {
    my ($link, $warm, $config) = @_;
    if (defined(my $why = ForkServer::Spares::Fit::unfit_for($warm, $config))) {
        local $SIG{PIPE} = 'IGNORE';
        syswrite $link, UNFIT . $why;
        POSIX::_exit(0);
    }
    return;
}

# As its siblings inherit them from the master ('' for none).
sub set_emperor_variables {
    my ($emperor_fd, $config_fd) = @_;
    for ([UWSGI_EMPEROR_FD => $emperor_fd], [UWSGI_EMPEROR_FD_CONFIG => $config_fd]) {
        my ($key, $value) = @$_;
        if (defined $value && length $value) { $ENV{$key} = $value } else { delete $ENV{$key} }
    }
    return;
}

1;
