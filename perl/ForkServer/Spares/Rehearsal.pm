package ForkServer::Spares::Rehearsal;
use strict;
use warnings;

use IO::Socket::IP ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM SOCK_SEQPACKET PF_UNSPEC SOL_SOCKET SCM_RIGHTS);
use Socket::MsgHdr ();
use Time::HiRes ();
use ForkServer::Base::Request ();
use ForkServer::Config ();
use ForkServer::HTTPServer ();
use ForkServer::Link ();
use ForkServer::Process::Session ();
use ForkServer::Spares::Fit ();
use ForkServer::Protocol qw(encode_packet encode_array decode_array MODIFIER1_FORK_SERVER MODIFIER1_CONFIG MASK_PIPE);
use ForkServer::Vassal::Identity ();
use ForkServer::Vassal ();

=head1 NAME

ForkServer::Spares::Rehearsal - run an adoption's code once, ahead of time, where it will run again

=head1 SYNOPSIS

  ForkServer::Spares::Rehearsal::adoption_request();    # in the base, after it forked a spare
  ForkServer::Spares::Rehearsal::vassal_start();        # in a spare, before it waits
  ForkServer::Spares::Rehearsal::worker_start();        # in a spare's worker, before it waits

=head1 DESCRIPTION

Right after a fork, every page of a Perl process is shared copy-on-write
with its parent, and Perl writes to memory even to run code it has run
before (reference counts, pads, the allocator's lists): the first time a
code path runs after a fork, each page it writes is a page fault and a
4 KB copy. Measured in a warm spare of the benchmark's heavy app, the
adoption's path between the pid reply and the first response took some
900 page faults (3 ms of about 5); the same code, run a second time in one
process, takes a tenth of that.

So whatever a spare (and its waiting worker, and the base after it forked
a spare) will run on an adoption's critical path is run beforehand (three
times: see C<TIMES>),
on stand-ins, off the critical path: the pages it writes are then the
process's own, and the real adoption runs on warm code. What is rehearsed
touches nothing outside the process: a socket bound to a loopback port
with no C<listen> (nobody can connect to it), socket pairs, F</dev/null>,
and a stand-in app (never the operator's app: that is C<early-warmup>'s
job). The cost is the pages copied: measured on warm spares of the
benchmark's heavy app with C<early-warmup = />, 1.5 MB more USS in a
spare (2.1 MB, was 0.6) and 1.2 MB more in its worker (3.9 MB, was 2.7),
2.7 MB per spare in all (median of 6 spares; psutil's
C<memory_full_info>, with the Perl side of c4a6d34 for "was").

=cut

# Once is not enough: the heavy benchmark app's `GET /` in a process just
# forked takes 3.0 ms, then 0.35 ms, then 0.25 ms (its steady state); the
# same holds for the server's own path. Three runs, then the real one.
use constant TIMES => 3;

# What an Emperor sends, in shape: an argv and a config text.
my @ARGV_SHAPE  = ('--http-socket', '127.0.0.1:8000', '--processes', '1');
my $CONFIG_TEXT = "[uwsgi]\nhttp-socket = 127.0.0.1:8000\nprocesses = 1\nenv = REHEARSAL=1\n";

# A stand-in for the app: the server's code is rehearsed, not the app's.
my $STAND_IN = sub { [200, ['Content-Type' => 'text/plain', 'Content-Length' => 3], ["ok\n"]] };

=head2 adoption_request()

The base's part, after it forked a spare (the fork made its pages shared
again): an adoption request read, checked and answered over a socket
pair, and the packet a spare is handed.

=cut

sub adoption_request {
    socketpair(my $client, my $server, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or return;
    socketpair(my $pipe, my $other, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or return;
    my $hdr = Socket::MsgHdr->new(buf => encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE, encode_array('perl', @ARGV_SHAPE)));
    $hdr->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack 'i', fileno $pipe);
    Socket::MsgHdr::sendmsg($client, $hdr, 0) or return;
    $server->blocking(0);
    my $req = ForkServer::Base::Request->new(sock => $server, peer => 'rehearsal', deadline => Time::HiRes::time() + 1);
    my $state = eval { $req->read_some } // '';
    if ($state eq 'complete') {
        encode_packet(MODIFIER1_FORK_SERVER, $req->mask, encode_array($req->argv));
        eval { $req->reply_pid($$) };
    }
    $req->close_all;
    return;
}

=head2 vassal_start()

The spare's part: the request handed over by the base (received with a
descriptor, checked), its options from an argv and a config text, the
server's arguments, a bound socket, the message its worker is sent.

=cut

sub vassal_start {
    if (my ($data, @fds) = _handed(encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE, encode_array('perl', @ARGV_SHAPE)))) {
        my $req = eval { ForkServer::Base::Request->handed_over(sock => undef, data => $data, fds => \@fds) };
        if ($req) { ForkServer::Config->guess_name($req->argv); $req->close_all }
        else      { POSIX::close($_) for @fds }
    }
    ForkServer::Process::Session::session_id();
    my $config = ForkServer::Config->from_argv([@ARGV_SHAPE], config_text => $CONFIG_TEXT);
    my $vassal = ForkServer::Vassal->new(config => $config);
    $vassal->title;
    $vassal->server_args(undef);
    # bound, never listening: a connection to it is refused
    my $sock = IO::Socket::IP->new(LocalHost => '127.0.0.1', LocalPort => 0, ReuseAddr => 1, Type => SOCK_STREAM);
    close $sock if $sock;
    decode_array(encode_array(1, $CONFIG_TEXT, @ARGV_SHAPE));
    return;
}

=head2 worker_start()

The waiting worker's part: the same options, and one whole request
through the HTTP server's own code (read, parsed, answered, logged to
F</dev/null>) over a socket pair, served by the stand-in app.

=cut

sub worker_start {
    my ($data, $fd) = _handed(encode_array(1, $CONFIG_TEXT, @ARGV_SHAPE)) or return;
    # the listening socket's handle (here a socket pair's end)
    my $sock = ForkServer::Vassal::listener_from_fd($fd);
    $sock ? close $sock : POSIX::close($fd);
    my ($has_text, $text, @argv) = decode_array($data);
    my $config = ForkServer::Config->from_argv(\@argv, config_text => $text);
    my $vassal = ForkServer::Vassal->new(config => $config);
    open my $null, '>', '/dev/null' or return;
    my $server = ForkServer::HTTPServer->new(app => $STAND_IN, $vassal->server_args($null), ready_w => $null);
    socketpair(my $client, my $conn, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or return;
    syswrite $client, "GET /rehearsal?x=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: rehearsal\r\nConnection: close\r\n\r\n";
    $server->serve_one($conn);
    shutdown $client, 1;
    1 while sysread $client, my $buf, 65536;
    _direct_start();
    return;
}

# The start from the base's own request (ForkServer::Spares::WorkerStart):
# the request decoded, the config packet peeked at with a descriptor (the
# output pipe's stand-in), the Emperor's argv and text parsed, judged.
sub _direct_start {
    my ($data, @fds) = _handed(encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE, encode_array('perl', @ARGV_SHAPE)))
        or return;
    my $req = eval { ForkServer::Base::Request->from_base(data => $data, fds => \@fds) };
    if ($req) { $req->fds_by_role; $req->close_all }
    else      { POSIX::close($_) for @fds }
    socketpair(my $emperor, my $config_pipe, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or return;
    my $hdr = Socket::MsgHdr->new(buf => encode_packet(MODIFIER1_CONFIG, 0, $CONFIG_TEXT));
    $hdr->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack 'i', fileno $emperor);
    Socket::MsgHdr::sendmsg($emperor, $hdr, 0) or return;
    my ($text, $output) = ForkServer::Spares::WorkerStart::peek_config(fileno $config_pipe);
    POSIX::close($output) if defined $output;
    my $config = ForkServer::Config->from_argv(['--ini', 'rehearsal.ini'], config_text => $text // $CONFIG_TEXT);
    ForkServer::Base::Adoption::early_start_fits($config);
    # bound, never listening, as the vassal's own socket would be
    my $sock = IO::Socket::IP->new(LocalHost => '127.0.0.1', LocalPort => 0, ReuseAddr => 1, Type => SOCK_STREAM);
    close $sock if $sock;
    my $id = ForkServer::Vassal::Identity::current();
    ForkServer::Spares::Fit::unfit_for({ id => $id, cwd => '/', env => {}, now => { id => $id, cwd => '/' } },
                                          $config);
    return;
}

# A message with one descriptor, sent and received over a link as a
# spare's are (ForkServer::Link).
sub _handed {
    my ($data) = @_;
    socketpair(my $ours, my $theirs, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or return;
    ForkServer::Link::send_fds($ours, $data, fileno $ours) or return;
    return ForkServer::Link::recv_fds($theirs);
}

1;
