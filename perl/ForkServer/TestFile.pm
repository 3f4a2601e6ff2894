package ForkServer::TestFile;
use strict;
use warnings;

use Fcntl qw(SEEK_SET);
use POSIX ();

# Loaded before anything else, so that its END block is the last to run
# in a test: after the test's, Test2's and every module's. See
# L</"Exit without global destruction">.
use ForkServer::Exit ();

my $SPEC;           # the test this process turned into, once it has

use ForkServer::Protocol qw(decode_array);

# Test2 is told it is being preloaded before anything can load it, so that
# the state Test::More builds while the base loads is not the state of a
# test (Test2::API's preload mode, made for this).
BEGIN {
    if (eval { require Test2::API; 1 }) {
        Test2::API::test2_start_preload();
    }
}

use goto::file ();    # loaded here, not in every test
use ForkServer ();    # a modulino: loaded, not run
use ForkServer::Base ();

our $IN_BASE;    # true inside serve(): become_test() may jump out of it

=head1 NAME

ForkServer::TestFile - run a Perl test file in a process forked from a preloaded base (C<emperor prove>)

=head1 SYNOPSIS

  # the base `emperor prove` starts (the -M modules are the user's preloads):
  perl -I perl -MForkServer::TestFile -MTest::More -MMoose \
      -e 'BEGIN { ForkServer::TestFile::serve(@ARGV) }' \
      -- --fork-server /tmp/x/fork.sock [--preload FILE]... [--inc-report FILE]

  # an adoption request whose argv is [PROGRAM, "--test-file", "t/a.t"],
  # with the test's stdout as the Emperor pipe (mask 0x01) and its stderr
  # as the config pipe (0x02), which first carries the test's spec.

=head1 DESCRIPTION

A base for tests is an ordinary base vassal (L<ForkServer::Base>) whose
fork server runs inside a C<BEGIN> block of its main program. A test is an
adopted vassal whose argv starts with C<--test-file>: the fork server forks
as for any adoption (the reply carries the pid), and the child, instead of
configuring itself as a web vassal, leaves the fork server's call stack,
makes itself look like a fresh C<perl FILE> process, returns from the
C<BEGIN> block and lets L<goto::file> replace the rest of the main program
with the test file. The test file is then the program perl runs: C<__FILE__>,
line numbers, C<__DATA__>, C<die> at the top level (exit status from C<$!>,
C<< $? >> 8 >> or 255), C<exit>, C<END> blocks and global destruction are
perl's own.

Before that, the child (L</become_test>):

=over

=item * reads its spec from the config pipe: an array packet of C<KEY=VALUE>
items (C<file>, C<cwd>, C<arg>, C<env>, C<inc>, C<warnings>, C<destruct>);

=item * puts the Emperor pipe on descriptor 1, the config pipe on 2 and
F</dev/null> on 0;

=item * sets C<%ENV>, the working directory, C<$0>, C<@ARGV>, C<@INC>,
C<$^T>, C<$^W> as C<perl FILE> would have them, reseeds C<srand>, recomputes
L<FindBin>, reopens the C<DATA> handles of preloaded modules (so tests
running side by side do not share a file offset), and gives Test2 and
Test::Builder a fresh state writing to the new descriptors.

=back

=cut

=head2 serve

  serve(@argv)

Runs the base (L<ForkServer/main> with C<@argv>, after C<require>ing each
C<--preload FILE>, and writing the files in C<%INC> to C<--inc-report FILE>,
separated by NUL bytes). Returns only in a test child, from inside the C<BEGIN>
block, with the rest of the main program replaced by the test file. In the
base it exits when the base stops.

=cut

sub serve {
    my (@argv) = @_;
    my (@base_argv, $inc_report);
    while (@argv) {
        my $arg = shift @argv;
        if ($arg eq '--preload') {
            my $file = shift @argv;
            my $ok = eval { package main; require $file; 1 };    ## no critic
            if (!$ok) {
                print STDERR "emperor prove: cannot preload '$file': $@";
                exit 2;
            }
        }
        elsif ($arg eq '--inc-report') { $inc_report = shift @argv }
        else { push @base_argv, $arg }
    }
    # what the base loaded, for `emperor prove --watch` to watch
    if (defined $inc_report) {
        open my $fh, '>', $inc_report or die "--inc-report '$inc_report': $!\n";
        print $fh join "\0", grep { defined && !ref } values %INC;
        close $fh or die "--inc-report '$inc_report': $!\n";
    }
    ForkServer::Exit::mark_base();
    _find_data_handles();
    my $spec = _serve_until_a_test(@base_argv);
    _become(%$spec);
    goto::file->import($spec->{file});
    return;
}

sub _serve_until_a_test {
    my (@argv) = @_;
    local $IN_BASE = 1;
    PROVE_TEST_CHILD: {
        ForkServer->main(@argv);    # exits in the base
    }
    return $SPEC;
}

=head2 become_test

  become_test(argv => \@argv, stdout => $fh, config_text => $text, stderr => $fh)

Called by L<ForkServer::Base> in the adopted child, after the pid reply.
Does not return: it leaves the fork server's call stack for L</serve>.

=cut

sub become_test {
    my (%args) = @_;
    die "this base does not run test files (it is not an `emperor prove` base)\n" unless $IN_BASE;
    my $spec = parse_spec($args{config_text});
    my (undef, $file) = @{ $args{argv} };
    die "--test-file '" . ($file // '') . "' does not match the spec's '$spec->{file}'\n"
        unless defined $file && $file eq $spec->{file};
    die "no stdout/stderr descriptors\n" unless $args{stdout} && $args{stderr};
    POSIX::dup2(fileno $args{stdout}, 1) // die "dup2 stdout: $!\n";
    POSIX::dup2(fileno $args{stderr}, 2) // die "dup2 stderr: $!\n";
    close $args{stdout};
    close $args{stderr};
    $SPEC = $spec;
    ForkServer::Exit::without_global_destruction() unless $spec->{destruct};
    no warnings 'exiting';
    last PROVE_TEST_CHILD;
}

=head2 parse_spec

  my $spec = parse_spec($text);    # a hash ref

=cut

sub parse_spec {
    my ($text) = @_;
    die "no spec on the config pipe\n" unless defined $text;
    my %spec = (arg => [], env => {}, inc => [], warnings => 0);
    for my $item (decode_array($text)) {
        my ($key, $value) = $item =~ /\A([a-z]+)=(.*)\z/s or die "bad spec item '$item'\n";
        if    ($key eq 'arg') { push @{ $spec{arg} }, $value }
        elsif ($key eq 'inc') { push @{ $spec{inc} }, $value }
        elsif ($key eq 'env') {
            my ($k, $v) = $value =~ /\A([^=]+)=(.*)\z/s or die "bad env item '$value'\n";
            $spec{env}{$k} = $v;
        }
        elsif ($key eq 'file' || $key eq 'cwd' || $key eq 'warnings' || $key eq 'destruct') { $spec{$key} = $value }
        else { die "unknown spec item '$key'\n" }
    }
    defined $spec{$_} or die "spec has no $_\n" for qw(file cwd);
    return \%spec;
}

# Everything `perl FILE` would have that a fork of the base has not.
sub _become {
    my (%spec) = @_;
    open STDIN, '<', '/dev/null' or die "STDIN from /dev/null: $!\n";
    %ENV = %{ $spec{env} };
    chdir $spec{cwd} or die "chdir '$spec{cwd}': $!\n";
    $0    = $spec{file};
    @ARGV = @{ $spec{arg} };
    @INC  = @{ $spec{inc} };
    $^T   = time;
    $^W   = $spec{warnings} ? 1 : 0;
    $@    = '';
    $?    = 0;
    $!    = 0;
    $SIG{$_} = 'DEFAULT' for grep { defined $SIG{$_} } keys %SIG;
    srand();    # else every test would draw the base's sequence
    FindBin::again() if defined &FindBin::again;
    Getopt::Long::ConfigDefaults() if defined &Getopt::Long::ConfigDefaults;
    _reopen_data_handles();
    _fresh_test2();
    return;
}

# A preloaded module's DATA handle shares its file offset with every fork:
# two tests reading it at once would read each other's lines. The handles
# are found once, in the base (looking through %INC takes milliseconds).
my @DATA_HANDLES;    # [package, file], open DATA handles of preloaded modules

sub _find_data_handles {
    @DATA_HANDLES = ();
    for my $file (keys %INC) {
        next unless $file =~ /\.pm\z/ && defined $INC{$file} && !ref $INC{$file};
        (my $pkg = $file) =~ s{/}{::}g;
        $pkg =~ s/\.pm\z//;
        my $fh = _data_handle($pkg) or next;
        push @DATA_HANDLES, [$pkg, $INC{$file}];
    }
    return;
}

# looked up in the stash, not by name: naming a glob would create it
sub _data_handle {
    my ($pkg) = @_;
    my $stash = do { no strict 'refs'; \%{"${pkg}::"} };
    my $glob = $stash->{DATA} or return;
    ref \$glob eq 'GLOB' or return;
    my $fh = *{$glob}{IO} or return;
    return defined fileno $fh ? $fh : undef;
}

sub _reopen_data_handles {
    for (@DATA_HANDLES) {
        my ($pkg, $file) = @$_;
        my $fh = _data_handle($pkg) or next;
        my $pos = tell $fh;
        next if $pos < 0;
        close $fh;
        open($fh, '<', $file) && seek($fh, $pos, SEEK_SET)
            or warn "emperor prove: cannot reopen ${pkg}::DATA ($file): $!\n";
    }
    return;
}

=head2 Exit without global destruction

A test leaves as L<ForkServer::Exit> describes: its C<END> blocks (File::Temp's
clean-up among them) run, what it holds in globals of packages the base did
not have is freed (so their C<DESTROY> methods run as under perl), every
handle is flushed, and C<_exit> skips the global destruction of the inherited
heap, which costs a test about 30 ms with the benchmark's stack, more than
the test itself. What is skipped: C<DESTROY> of objects the test stored
inside preloaded modules' variables. The spec item C<destruct=1> (C<emperor
prove --destruct>) keeps perl's global destruction.

=cut

# Test2 (and Test::Builder on it), if preloaded: the base loaded them in
# preload mode, which builds no hub; this makes the instance this process's,
# writing to its new STDOUT/STDERR. Test::Builder resets itself when Test2
# loads in this process (its post-load callback).
sub _fresh_test2 {
    return unless $INC{'Test2/API.pm'};
    Test2::API::test2_stop_preload();
    Test2::API::test2_post_preload_reset();
    return;
}

1;
