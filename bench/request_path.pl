#!/usr/bin/perl
# CPU time of the HTTP server's request path, in process: one worker's
# _serve_head on a keep-alive GET over a socketpair (head parsing, the app,
# the response write, the access log line to /dev/null or none), no
# select() loop and no network. Prints "us_per_request=N" for bench/run.py.
# usage: perl -I perl bench/request_path.pl APP.psgi [--log] [--n N]
use strict;
use warnings;
use Getopt::Long ();
use Plack::Util ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use ForkServer::HTTPServer;

my ($log, $n) = (0, 100_000);
Getopt::Long::GetOptions('log' => \$log, 'n=i' => \$n) or die "bad options\n";
my $app = Plack::Util::load_psgi(shift // die "usage: $0 APP.psgi [--log] [--n N]\n");
open my $null, '>', '/dev/null' or die "/dev/null: $!\n";
my $s = ForkServer::HTTPServer->new(app => $app, name => 'bench', access_log => ($log ? $null : undef));
socketpair(my $ours, my $client, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!\n";
pipe(my $r, my $w) or die "pipe: $!\n";
my $stop = 0;
@$s{qw(server_name server_port stopping_ref ready_w stop_r requests)} = ('127.0.0.1', 80, \$stop, $w, $r, 0);
my $req = "GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";
my $c = { sock => $ours, buf => '', raddr => '127.0.0.1', rport => 1234, in_head => 1,
          deadline => 0, started => 1, informational => sub {} };
my $run = sub {
    for (1 .. $_[0]) {
        $c->{buf} = $req;
        $s->_serve_head($c) or die "connection not kept\n";
        sysread($client, my $junk, 65536);    # the response, drained
    }
};
$run->(1000);    # warm-up
my @t0 = times;
$run->($n);
my @t1 = times;
printf "us_per_request=%.2f\n", (($t1[0] + $t1[1]) - ($t0[0] + $t0[1])) * 1e6 / $n;
