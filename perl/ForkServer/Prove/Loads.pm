package ForkServer::Prove::Loads;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::Loads - what each forked test loaded, for the next run's preload (C<emperor prove --state>)

=head1 SYNOPSIS

  # in the forked test (ForkServer::Prove::TestFile, spec item loads=FILE):
  ForkServer::Prove::Loads::report_at_exit($file);

  # in prove (ForkServer::Prove::Source), when the test has ended:
  ForkServer::Prove::Loads::remember($state_manager, $test_file, \%base_inc, @keys);

  # in prove, for the next run's automatic preload:
  my @modules = ForkServer::Prove::Loads::preloads($state_manager, \@test_files, \&use_lines);

=head1 DESCRIPTION

With C<--state>, a forked test writes at exit (after its own C<END> blocks)
the C<%INC> keys it added to the base's; C<.prove> keeps them per file
(C<emperor_loads>), with those of the base's modules the file C<use>s or
recorded in an earlier run (they are preloaded now, so not added). The next
run preloads what at least a tenth of the files loaded, except a module
that broke at least a tenth of the files that load it, and two of them at
least, or the only one (L</blame>).

=cut

our ($LOADS_FILE, %BASE_KEYS);

=head2 report_at_exit

  report_at_exit($file);    # in the test child, before the test compiles

=cut

sub report_at_exit {
    ($LOADS_FILE) = @_;
    %BASE_KEYS = map { $_ => 1 } keys %INC;
    # compiled now, before the test's: its END blocks run first
    eval 'END { ForkServer::Prove::Loads::_write() } 1' or die $@;    ## no critic
    return;
}

sub _write {
    local ($!, $?, $@);
    open my $fh, '>', $LOADS_FILE or return;
    # modules from files (not packages a test marks loaded, `$INC{'Foo.pm'} = 1`)
    print $fh join "\0", grep {
        !$BASE_KEYS{$_} && defined $INC{$_} && !ref $INC{$_} && $INC{$_} ne $0 && -f $INC{$_}
    } keys %INC;
    close $fh;
    return;
}

=head2 read_report

  my @keys = read_report($file);    # and removes it

=cut

sub read_report {
    my ($file) = @_;
    open my $fh, '<', $file or return;
    my @keys = split /\0/, do { local $/; <$fh> } // '';
    close $fh;
    unlink $file;
    return @keys;
}

=head2 remember

  remember($state_manager, $test_file, \%base_inc, \@use_line_keys, @keys);

Records in the state what the file loaded: the modules among C<@keys> (not
pragmas, not other files), and those of the base's (C<%base_inc>) that the
file C<use>s or that its earlier record names.

=cut

sub remember {
    my ($state, $file, $base_inc, $uses, @loaded) = @_;
    my $test = eval { $state->results->test($file) } or return;
    my %keys = map { $_ => 1 } grep { is_module_key($_) } @loaded;
    my %from_base = map { $_ => 1 } split(' ', $test->{emperor_loads} // ''), @$uses;
    $keys{$_} = 1 for grep { $base_inc->{$_} } keys %from_base;
    $test->{emperor_loads} = join ' ', sort keys %keys;
    return;
}

=head2 blame

  my @keys = blame($test_record, \%base_inc, \%previous_base_inc);

For a file that failed forked and passed cold: the modules the base has
loaded this run and had not the run before, among those the file's record
says it loads (C<%INC> keys). A preload that changed under the file is the
likelier cause than the file: they are added to its record
(C<emperor_blame>), for L</preloads>.

=cut

sub blame {
    my ($test, $base_inc, $previous) = @_;
    my @keys = grep { $base_inc->{$_} && !$previous->{$_} } split ' ', $test->{emperor_loads} // '';
    return () unless @keys;
    my %all = map { $_ => 1 } @keys, split ' ', $test->{emperor_blame} // '';
    $test->{emperor_blame} = join ' ', sort keys %all;
    return sort @keys;
}

=head2 preloads

  my ($learned, @modules) = preloads($state_manager, \@files, \&use_lines);

The modules at least a tenth of the files (and two) loaded, the most used first,
except those that broke a tenth of the files that load them, two files at
least, or the only one (L</blame>); a file without a record counts C<use_lines($file)> (module
names). C<$learned> is false when no file has a record (the caller then
chooses by C<use> lines).

=cut

sub preloads {
    my ($state, $files, $use_lines) = @_;
    my $tests = eval { $state->results->{tests} } || {};
    my (%count, %broke, $n, $learned);
    for my $file (grep {/\.t\z/} @$files) {
        my $record = $tests->{$file} ? $tests->{$file}{emperor_loads} : undef;
        my @modules;
        if (defined $record) {
            $learned++;
            @modules = map { module_of($_) } split ' ', $record;
            $broke{ module_of($_) }++ for split ' ', $tests->{$file}{emperor_blame} // '';
        }
        else {
            next unless -r $file;
            @modules = $use_lines->($file);
        }
        $n++;
        $count{$_}++ for @modules;
    }
    return (0) unless $learned;
    # (one file alone, among others that load the module, may have failed
    # for a reason of its own: it is not enough)
    my $kept = sub { my $b = $broke{ $_[0] } // 0; $b * 10 < $count{ $_[0] } || ($b < 2 && $b < $count{ $_[0] }) };
    my @common = grep { common($count{$_}, $n) && $kept->($_) } keys %count;
    return (1, sort { $count{$b} <=> $count{$a} || $a cmp $b } @common);
}

=head2 is_module_key, module_of

  is_module_key('Foo/Bar.pm');    # true: a module's %INC key (not a pragma's, not a file's)
  module_of('Foo/Bar.pm');        # 'Foo::Bar'

=cut

sub is_module_key { return $_[0] =~ m{\A[A-Z]\w*(?:/\w+)*\.pm\z} }

sub module_of {
    (my $module = $_[0]) =~ s{/}{::}g;
    $module =~ s/\.pm\z//;
    return $module;
}

=head2 use_line_preloads

  my @modules = use_line_preloads(@test_files);

The modules (not pragmas) that at least a tenth of the files (and two) C<use>, read
from their C<use> lines, in order of how many use them.

=cut

sub use_line_preloads {
    my (@files) = @_;
    my %count;
    my $n = 0;
    for my $file (grep {/\.t\z/} @files) {
        my $text = program_text($file) // next;
        $n++;
        my %seen;
        $seen{$1}++ while $text =~ /^\s*use\s+([A-Z][\w:]*)/mg;
        $count{$_}++ for keys %seen;
    }
    return () unless $n;
    my @common = grep { common($count{$_}, $n) } keys %count;
    return sort { $count{$b} <=> $count{$a} || $a cmp $b } @common;
}

# Loaded by at least a tenth of the files, and by two of them: in a suite of
# a few files, what one file alone loads (a prerequisites report's hundreds
# of modules) would be paid for by all of them before any runs.
sub common {
    my ($loaded_by, $files) = @_;
    return $loaded_by * 10 >= $files && $loaded_by >= 2;
}

# The modules a file's `use` lines name (not pragmas).
sub use_lines {
    my ($file) = @_;
    my $text = program_text($file) // return;
    my %seen;
    $seen{$1}++ while $text =~ /^\s*use\s+([A-Z][\w:]*)/mg;
    return keys %seen;
}

# The program part of a file (up to __END__/__DATA__), or undef.
sub program_text {
    my ($file) = @_;
    open my $fh, '<', $file or return undef;
    local $/;
    my $text = <$fh> // '';
    $text =~ s/^__(?:END|DATA)__\b.*//ms;
    return $text;
}

1;
