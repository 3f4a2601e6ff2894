use strict;
use warnings;
use Test::More;
use Config;
use File::Temp qw(tempdir);

# ForkServer::Base::Clone's clone_parent with in_child, in real processes:
# a program clones a child that is born this test's child; given in_child,
# the child runs the method at once with its arguments and every signal
# unblocked, never coming back to the program's code after the clone; a
# method that returns is a bug the child dies of; the program itself gets
# the child's pid and its own signal mask back.

plan skip_all => 'clone(CLONE_PARENT) is x86_64 Linux only'
    unless $^O eq 'linux' && $Config{archname} =~ /^x86_64-/;

my $dir = tempdir(CLEANUP => 1);

# Runs the program; returns (the lines it and its cloned child wrote, the
# child's exit status, reaped here: the child is ours).
sub run_program {
    my ($name, $method_body) = @_;
    my $log = "$dir/$name.log";
    my $program = <<"PERL";
use strict;
use ForkServer::Base::Clone ();
open STDERR, '>>', '$log.err' or die;
sub say_line { open my \$fh, '>>', '$log' or die; syswrite \$fh, "\$_[0]\\n"; close \$fh }
sub mask { open my \$fh, '<', "/proc/\$\$/status" or die; my (\$m) = map { /^SigBlk:\\s*(\\S+)/ ? \$1 : () } <\$fh>; \$m }
sub Kid::run { my (\$class, \@args) = \@_; $method_body }
my (\$ok, \$why) = ForkServer::Base::Clone::probe();
\$ok or do { say_line("probe failed: \$why"); exit 0 };
my \$pid = ForkServer::Base::Clone::clone_parent(in_child => ['Kid', 'run', 'a', 'b']);
say_line(\$pid ? "parent got \$pid mask " . mask() : "returned in the child");
POSIX::_exit(0);
PERL
    system($^X, '-Iperl', '-MPOSIX', '-e', $program) == 0 or die "program failed: $?";
    local $SIG{ALRM} = sub { die "the cloned child did not end\n" };
    alarm 20;
    my $child = waitpid(-1, 0);
    my $status = $?;
    alarm 0;
    open my $fh, '<', $log or die "$log: $!";
    chomp(my @lines = <$fh>);
    return (\@lines, $child, $status);
}

my ($lines, $child, $status) = run_program('runs', <<'BODY');
say_line("child $$ of " . getppid() . " args @args mask " . mask());
POSIX::_exit(7);
BODY
plan skip_all => $lines->[0] if $lines->[0] =~ /^probe failed/;
my ($kid) = map { /^child (\d+) of (\d+) args a b mask (\S+)$/ ? [$1, $2, $3] : () } @$lines;
ok($kid, 'the cloned child ran the method with its arguments') or diag explain $lines;
is($kid->[1], $$, 'the child is born the child of the program\'s parent');
like($kid->[2], qr/\A0+\z/, 'the child runs with no signal blocked');
is($child, $kid->[0], 'this test reaps it');
is($status >> 8, 7, 'its exit is the method\'s');
ok(!grep({ /returned in the child/ } @$lines), 'the child never came back to the code after the clone');
my ($parent) = map { /^parent got (\d+) mask (\S+)$/ ? [$1, $2] : () } @$lines;
is($parent->[0], $kid->[0], 'the program gets the child\'s pid');
like($parent->[1], qr/\A0+\z/, 'and its signal mask back');

($lines, $child, $status) = run_program('returns', 'return 1;');
ok(!grep({ /returned in the child/ } @$lines), 'a method that returns does not come back to the caller either');
isnt($status >> 8, 0, 'the child dies of it');
open my $err, '<', "$dir/returns.log.err" or die;
like(join('', <$err>), qr/BUG: run returned in a cloned child/, 'saying so');

done_testing;
