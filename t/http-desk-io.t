use strict;
use warnings;
use Test::More;
use FindBin;
use File::Temp ();
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# A free worker never waits for a disk in its loop. The requests file (the
# Emperor's counts, in the run directory) lives on a disk; a write to it
# waits for the file system's journal whenever someone else keeps that
# busy (tens to hundreds of milliseconds on a shared machine). A worker
# that wrote its count there after each round sat in that write while a
# request waited on a kept connection of its busy sibling: the request
# waited for the slow one. Here the run directory's file system is frozen
# (fsfreeze: every write to it waits until it is thawed), the most a
# journal can make a write wait.

plan skip_all => 'needs root (mounts and freezes a file system of its own)' if $> != 0;
my %tool;
for my $name (qw(mkfs.ext4 fsfreeze mount umount)) {
    ($tool{$name}) = grep { -x } map { "$_/$name" } qw(/usr/sbin /sbin /usr/bin /bin);
    plan skip_all => "no $name" unless $tool{$name};
}

my $test_pid = $$;
my $tmp = File::Temp::tempdir(CLEANUP => 1);
my $mnt = "$tmp/run";
my ($mounted, $frozen, $srv) = (0, 0);
sub thaw { system($tool{fsfreeze}, '-u', $mnt) if $frozen; $frozen = 0 }
# the server's workers leave through exit() too: only this process cleans up
END {
    if ($$ == $test_pid) {
        my $st = $?;
        thaw();
        if ($mounted) {
            $srv->stop if $srv;    # it holds the requests file open
            system($tool{umount}, $mnt);
        }
        $? = $st;
    }
}
mkdir $mnt or die "mkdir: $!";
{
    open my $img, '>', "$tmp/fs.img" or die "image: $!";
    truncate $img, 8 << 20 or die "truncate: $!";
}
plan skip_all => 'cannot make a loop-mounted file system here'
    unless system("$tool{'mkfs.ext4'} -q -F $tmp/fs.img >/dev/null 2>&1") == 0
        && system("$tool{mount} -o loop $tmp/fs.img $mnt >/dev/null 2>&1") == 0;
$mounted = 1;

$ENV{PSGI_FORKSERVER_RUN_DIR} = $mnt;
$srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2);
ok $srv->wait_ready, 'ready';
my $dir = $srv->dir;
ok wait_for(sub { -e "$mnt/requests-" . $srv->pid }, 10), 'the requests file is in the run directory';

# two kept connections of one worker and one of the other: each made
# while the other worker is held in a request, so that only one can accept
sub kept_while_held {
    my ($held, $name) = @_;
    print { $held->[0] } "GET /block?$name HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e "$dir/$name.started" }, 20), "a worker is held ($name)";
    my $c = [connect_to($srv->port), \(my $buf = '')];
    my $r = request_on($c->[0], $c->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    open my $go, '>', "$dir/$name.go" or die; close $go;
    my $h = read_response($held->[0], $held->[1], timeout => 20);
    my ($held_pid) = ($h && $h->{body} // '') =~ /^done \w+ (\d+)$/;
    return ($c, $r && $r->{body}, $held_pid);
}
my $first = [connect_to($srv->port), \(my $buf0 = '')];
my ($free, $free_pid, $busy_pid) = kept_while_held($first, 'hold1');
my ($waiting, $busy_pid2, $free_pid2) = kept_while_held($free, 'hold2');
ok $busy_pid && $free_pid && $busy_pid ne $free_pid && $busy_pid2 eq $busy_pid && $free_pid2 eq $free_pid,
    'two kept connections of one worker, one of the other';
my $slow = $first;

print { $slow->[0] } "GET /block?slow HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/slow.started" }, 20), 'one worker is in a slow request';
is system($tool{fsfreeze}, '-f', $mnt), 0, 'the run directory\'s file system is frozen';
$frozen = 1;

# the free worker serves a request of its own (and counts it)
my $r = request_on($free->[0], $free->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
is $r && $r->{body}, $free_pid, 'the free worker answers on its own connection';
# then a request arrives on a kept connection of the busy worker
$r = request_on($waiting->[0], $waiting->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 5);
ok $r && $r->{status} == 200, 'a request on the busy worker\'s other connection is answered';
is $r && $r->{body}, $free_pid, "... by the free worker";
ok !-e "$dir/slow.go" && $frozen, '... while the slow request runs and the disk cannot be written';

thaw();
open my $go, '>', "$dir/slow.go" or die; close $go;
$r = read_response($slow->[0], $slow->[1], timeout => 20);
like $r && $r->{body} // '', qr/^done slow \d+$/, 'the slow request is answered';
ok wait_for(sub {
    open my $fh, '<', "$mnt/requests-" . $srv->pid or return 0;
    my $bytes = do { local $/; <$fh> } // '';
    my $n = 0;
    $n += (unpack 'Q<Q<', substr($bytes, $_ * 16, 16))[0] for 0 .. int(length($bytes) / 16) - 1;
    return $n >= 5;
}, 10), 'the requests are counted in the file';
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
