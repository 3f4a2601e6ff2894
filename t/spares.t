# ForkServer::Spares as the base's loop drives it, with socket pairs for the
# spares' links and for the requester: what the pool does with a request,
# a spare that died, a requester that left, a readiness already used.
use strict;
use warnings;
use Test::More;
use lib 't/lib', 'perl';
use IO::Select ();
use Socket::MsgHdr ();
use POSIX ();
use Time::HiRes ();
use Socket qw(AF_UNIX SOCK_SEQPACKET SOCK_STREAM PF_UNSPEC);
use ForkServer::Base::Request ();
use ForkServer::Config ();
use ForkServer::Link ();
use ForkServer::Protocol qw(encode_packet encode_array decode_dict read_packet MODIFIER1_FORK_SERVER MODIFIER1_CONFIG
                            MASK_PIPE MASK_CONFIG);
use ForkServer::Process::Descriptors ();
use ForkServer::Spares ();

my $log = '';
{
    no warnings 'redefine';
    *ForkServer::Spares::log = sub { $log .= "$_[1]\n" };
}

sub new_pool {
    my $base = { name => 'sp', config => ForkServer::Config->from_argv([]), app => undef };
    my $pool = ForkServer::Spares->new(base => $base, count => 2);
    $pool->watch_with(IO::Select->new);
    return $pool;
}

# A spare as the base sees it: the base's end in the pool, the spare's end returned.
sub new_spare {
    my ($pool, $pid, %opt) = @_;
    socketpair(my $base_end, my $spare_end, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die $!;
    $pool->_add($base_end, undef);
    syswrite $spare_end, "R$pid";
    $pool->readable($base_end) unless $opt{unread};
    return ($spare_end, $base_end);
}

# A complete adoption request, as the base has it once read; and the requester's end.
sub new_request {
    socketpair(my $client, my $server, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
    socketpair(my $pipe, my $other, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
    ForkServer::Link::send_fds($client, encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE,
        encode_array('perl', '--http-socket', '127.0.0.1:8000')), fileno $pipe) or die $!;
    $server->blocking(0);
    my $req = ForkServer::Base::Request->new(sock => $server, peer => 'test', deadline => time + 5);
    is $req->read_some, 'complete', 'a complete request';
    return ($req, $client);
}

sub pid_reply {
    my ($client) = @_;
    my (undef, undef, $body) = read_packet($client);
    return { decode_dict($body) }->{pid};
}

subtest 'the base replies with the oldest ready spare\'s pid, then hands it the request' => sub {
    my $pool = new_pool();
    my ($first)  = new_spare($pool, 111);
    my ($second) = new_spare($pool, 222);
    is $pool->ready, 2, 'two ready';
    my ($req, $client) = new_request();
    ok $pool->take($req), 'taken';
    is pid_reply($client), 111, 'the pid reply, from the base';
    my ($data, @fds) = ForkServer::Link::recv_fds($first);
    like $data, qr{--http-socket}, 'the spare got the request';
    is scalar @fds, 1, 'with its one descriptor (and no connection to the requester)';
    POSIX::close($_) for @fds;
    is $pool->ready, 1, 'the other one waits';
};

subtest 'a readiness the loop holds after take() used it does not block the base' => sub {
    my $pool = new_pool();
    my ($kept) = new_spare($pool, 111);
    my ($late, $late_base) = new_spare($pool, 222, unread => 1);    # its R is in the loop's @ready
    my ($req, $client) = new_request();
    ok $pool->take($req), 'taken';
    is pid_reply($client), 111, 'by the older spare';
    is $pool->ready, 1, 'take() read the late spare\'s R';
    my $blocked = !eval {
        local $SIG{ALRM} = sub { die "blocked\n" };
        alarm 5;
        $pool->readable($late_base);    # what the loop does next with its @ready
        alarm 0;
        1;
    };
    ok !$blocked, 'readable() returned at once';
    is $pool->ready, 1, 'the late spare still waits, ready';
};

subtest 'a spare that died is never given a request' => sub {
    my $pool = new_pool();
    my ($dead) = new_spare($pool, 333);
    close $dead;    # its end of file is not read yet
    my ($req, $client) = new_request();
    ok !$pool->take($req), 'not taken: the base forks';
    is $pool->size, 0, 'the dead spare is gone from the pool';
    like $log, qr{spare pid 333 ended before it was adopted}, 'one line';
    $client->blocking(0);
    ok !defined sysread($client, my $buf, 64), 'no pid reply was sent';
};

subtest 'a requester that left: the spare is given the request all the same, as a clone would be' => sub {
    # its warm worker may have it already (the base hands it over before
    # the reply): the vassal sees end of file on its Emperor pipe and stops
    my $pool = new_pool();
    my ($spare) = new_spare($pool, 444);
    my ($req, $client) = new_request();
    close $client;
    $log = '';
    ok $pool->take($req), 'done with';
    like $log, qr{\Avassal pid 444: sending the pid reply: }, 'one line';
    my ($data, @fds) = ForkServer::Link::recv_fds($spare);
    like $data, qr{--http-socket}, 'the spare got the request';
    POSIX::close($_) for @fds;
    is $pool->ready, 0, 'it is no spare of the pool any more';
    $req->close_all;
};

subtest 'a signal caught while a link waits is not its end of file' => sub {
    # A waiting spare's worker blocks in recv_fds for as long as no adoption
    # comes; a signal the app handles (its own $SIG{USR2}, say) interrupts
    # the call: it must wait on, not take it for the spare's end and exit.
    socketpair(my $ours, my $theirs, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die $!;
    pipe(my $caught_r, my $caught_w) or die $!;
    my $sender = fork // die "fork: $!";
    if ($sender == 0) {
        close $ours;
        sysread $caught_r, my $byte, 1;    # once the signal was caught
        ForkServer::Link::send_fds($theirs, 'after the signal', fileno $theirs);
        POSIX::_exit(0);
    }
    close $theirs;
    close $caught_r;
    my $caught = 0;
    local $SIG{ALRM} = sub { $caught++; syswrite $caught_w, 'x' };
    Time::HiRes::ualarm(200_000);
    my ($data, @fds) = ForkServer::Link::recv_fds($ours);
    Time::HiRes::ualarm(0);
    waitpid $sender, 0;
    is $caught, 1, 'the signal came';
    is $data, 'after the signal', 'the message that came after it';
    is scalar @fds, 1, 'with its descriptor';
    POSIX::close($_) for @fds;
};

subtest 'master = false: the warm worker is given the requester and replies itself; the spare is told so' => sub {
    my $pool = new_pool();
    socketpair(my $base_end, my $spare_end, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die $!;
    socketpair(my $for_base, my $worker_end, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC) or die $!;
    $pool->_add($base_end, undef);
    ForkServer::Link::send_fds($spare_end, 'R333', fileno $for_base) or die $!;
    close $for_base;
    $pool->readable($base_end);
    is $pool->ready, 1, 'a ready spare with its worker\'s link';
    socketpair(my $client, my $server, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
    socketpair(my $pipe, my $other, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
    ForkServer::Link::send_fds($client, encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE,
        encode_array('perl', '--http-socket', '127.0.0.1:8000', '--master=false')), fileno $pipe) or die $!;
    $server->blocking(0);
    my $req = ForkServer::Base::Request->new(sock => $server, peer => 'test', deadline => time + 5);
    is $req->read_some, 'complete', 'a complete request';
    ok $pool->take($req), 'taken';
    $req->close_all;
    my ($data, @fds) = ForkServer::Link::recv_fds($worker_end);
    like $data, qr/\AR#/, 'the worker is told the reply is its own';
    is scalar @fds, 2, 'with the Emperor pipe and the requester';
    $client->blocking(0);
    ok !defined sysread($client, my $nothing, 64), 'no pid reply from the base';
    my ($spare_data, @spare_fds) = ForkServer::Link::recv_fds($spare_end);
    like $spare_data, qr/\AO#/, 'the spare is told its worker replies';
    is scalar @spare_fds, 1, 'the spare has no connection to the requester';
    POSIX::close($_) for @spare_fds, $fds[0];
    ForkServer::Spares::WorkerStart::reply_pid($fds[1], 4444);
    $client->blocking(1);
    is pid_reply($client), 4444, 'the worker\'s pid reply reaches the requester';
};

subtest 'a vassal that may be master = false: told by its argv or its config packet, which stays unread' => sub {
    # a request as emperor run sends it: the Emperor pipe and the config
    # pipe, whose packet carries the vassal's output pipe
    my $request = sub {
        my ($config, @argv) = @_;
        socketpair(my $client, my $server, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
        socketpair(my $pipe, my $other, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
        socketpair(my $cfg, my $emperor_cfg, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
        pipe(my $out_r, my $out_w) or die $!;
        ForkServer::Link::send_fds($emperor_cfg, encode_packet(MODIFIER1_CONFIG, 0, $config), fileno $out_w) or die $!
            if defined $config;
        ForkServer::Link::send_fds($client, encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE | MASK_CONFIG,
            encode_array('perl', '--ini', 'x.ini', @argv)), fileno $pipe, fileno $cfg) or die $!;
        $server->blocking(0);
        my $req = ForkServer::Base::Request->new(sock => $server, peer => 'test', deadline => time + 5);
        $req->read_some eq 'complete' or die 'incomplete';
        return ($req, $emperor_cfg, $cfg);
    };
    my @open_before = ForkServer::Process::Descriptors::open_fds();
    for my $case (["[uwsgi]\nhttp-socket = :1\nmaster = false\n", 1], ["[uwsgi]\nMaster=Off\r\n", 1],
                  ["[uwsgi]\nmaster = 0\n", 1], ["[uwsgi]\nmaster = true\n", 0], ["[uwsgi]\nprocesses = 2\n", 0],
                  ["[uwsgi]\n# master = false\n", 0], [undef, 1, 'its config not sent yet'],
                  ["[uwsgi]\n", 1, 'an argv naming master', '--master=false']) {
        my ($config, $want, $what, @argv) = @$case;
        my ($req, $emperor_cfg, $cfg) = $request->($config, @argv);
        is ForkServer::Spares::Solo::may_be_solo($req) ? 1 : 0, $want, $what // "config: " . join(' | ', split /\r?\n/, $config);
        if (defined $config) {
            my $hdr = Socket::MsgHdr->new(buflen => 4096, controllen => 64);
            Socket::MsgHdr::recvmsg($cfg, $hdr, 0) or die $!;
            is $hdr->buf, encode_packet(MODIFIER1_CONFIG, 0, $config), 'the config packet is still whole in the pipe';
            my (undef, undef, $fds) = $hdr->cmsghdr;
            my @fds = unpack 'i*', $fds // '';
            is scalar @fds, 1, 'with its output pipe';
            POSIX::close($_) for @fds;
        }
        $req->close_all;
    }
    is_deeply [ForkServer::Process::Descriptors::open_fds()], \@open_before, 'no descriptor left open by the peeks';
};

done_testing;
