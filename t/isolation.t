use strict;
use warnings;
use Test::More;
use lib 'perl';
use File::Temp qw(tempdir);
use POSIX ();
use ForkServer::Process::Descriptors ();
use ForkServer::Process::Random ();
use ForkServer::Spares::EnvReads ();

plan skip_all => 'Linux only' unless $^O eq 'linux';

my $dir = tempdir(CLEANUP => 1);

# Runs $code in a child; its result as one line through a pipe.
sub in_child {
    my ($code) = @_;
    pipe(my $r, my $w) or die;
    my $pid = fork // die;
    if (!$pid) {
        close $r;
        my $out = eval { $code->(fileno $w) } // "died: $@";
        syswrite $w, $out;
        POSIX::_exit(0);
    }
    close $w;
    local $/;
    my $got = <$r>;
    waitpid $pid, 0;
    return $got;
}

subtest 'close_all_but: closes every other descriptor, each number then on /dev/null' => sub {
    open my $secret, '>', "$dir/secret" or die;
    print {$secret} "s3cret\n";
    close $secret;
    open my $app, '<', "$dir/secret" or die;
    open my $kept, '<', "$dir/secret" or die;
    my ($a, $k) = (fileno $app, fileno $kept);
    my $got = in_child(sub {
        my ($out) = @_;
        my @closed = ForkServer::Process::Descriptors::close_all_but(0, 1, 2, $k, $out);
        my %fds = map { $_ => readlink("/proc/self/fd/$_") } ForkServer::Process::Descriptors::open_fds();
        my $line = <$app>;
        my $kline = <$kept>;
        open my $next, '<', "$dir/secret" or die;    # never on the app's old number
        join ';', "closed @closed", "app $fds{$a}", "kept " . ($fds{$k} // '-'),
            "read " . (defined $line ? $line : 'eof'), "kept read $kline", "next " . (fileno($next) == $a ? 'reused' : 'new');
    });
    like $got, qr/closed .*\b$a\b/, 'the app\'s descriptor is among those closed';
    like $got, qr{app /dev/null;}, 'its number points at /dev/null';
    like $got, qr{kept \Q$dir\E/secret;}, 'the kept one is still the file';
    like $got, qr{read eof;}, 'the app\'s handle reads nothing of the file';
    like $got, qr{kept read s3cret}, 'the kept handle reads it';
    like $got, qr{next new}, 'a file opened afterwards gets another number';
};

subtest 'describe: a path, a pipe, a socket kind' => sub {
    pipe(my $r, my $w) or die;
    use Socket qw(AF_INET SOCK_STREAM);
    socket(my $s, AF_INET, SOCK_STREAM, 0) or die;
    bind($s, Socket::pack_sockaddr_in(0, Socket::inet_aton('127.0.0.1'))) or die;
    open my $f, '<', "$dir/secret" or die;
    is ForkServer::Process::Descriptors::describe(fileno $f), "$dir/secret";
    is ForkServer::Process::Descriptors::describe(fileno $r), 'pipe';
    is ForkServer::Process::Descriptors::describe(fileno $s), 'TCP socket (IPv4)';
};

subtest 'reseed: two forks of one process draw different numbers' => sub {
    my $x = rand;    # the parent's generator is seeded and in use
    my @draws = map { in_child(sub { ForkServer::Process::Random::reseed(); int(rand(1e15)) }) } 1 .. 2;
    isnt $draws[0], $draws[1], 'each child its own sequence';
    my @same = map { in_child(sub { int(rand(1e15)) }) } 1 .. 2;
    is $same[0], $same[1], 'without it, the same (what reseed is for)';
};

subtest 'EnvReads: the keys read, %ENV kept with what the code set' => sub {
    local $ENV{PF_A} = 'a';
    local $ENV{PF_B} = 'b';
    my $keys = ForkServer::Spares::EnvReads::during(sub { my $x = $ENV{PF_A}; my $y = exists $ENV{PF_NONE}; $ENV{PF_SET} = 1 });
    is_deeply $keys, ['PF_A', 'PF_NONE'], 'fetched and tested keys';
    is $ENV{PF_SET}, 1, 'what it set stays';
    is `echo \$PF_SET`, "1\n", '... in the C environment too';
    delete $ENV{PF_SET};
    is_deeply ForkServer::Spares::EnvReads::during(sub { my @k = keys %ENV }), ['*'], 'a walk reads everything';
};

done_testing;
