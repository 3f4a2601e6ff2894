package ForkServer::Prove::Shard;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::Shard - split a test run into N balanced parts (C<emperor prove --shard I/N>)

=head1 DESCRIPTION

Every file goes to exactly one part. Files are weighed by their time in a
previous run (C<--state>'s F<.prove>, or a JUnit file's C<time>
attributes), else by their size; the heaviest first, each to the lightest
part so far (ties: the lower part number), so the parts finish together.
The split depends only on the file list and the weights: every job of a
CI matrix computes the same one.

=head2 parse

  my ($i, $n) = parse("2/4");    # dies on anything but 1 <= I <= N

=cut

sub parse {
    my ($spec) = @_;
    my ($i, $n) = ($spec // '') =~ m{\A(\d+)/(\d+)\z}
        or die "emperor prove: --shard wants I/N (e.g. 1/4), not '" . ($spec // '') . "'\n";
    die "emperor prove: --shard $spec: I must be from 1 to N\n" unless $n >= 1 && $i >= 1 && $i <= $n;
    return ($i, $n);
}

=head2 previous_times

  my %seconds = previous_times(state => $state_manager, junit => $file);

=cut

sub previous_times {
    my (%args) = @_;
    my %times;
    if (my $state = $args{state}) {
        my $results = eval { $state->results };
        for my $name ($results ? $results->test_names : ()) {
            my $t = $results->test($name);
            $times{$name} = $t->{elapsed} if defined $t->{elapsed};
        }
    }
    if (defined $args{junit}) {
        open my $fh, '<', $args{junit} or die "emperor prove: --shard-times $args{junit}: $!\n";
        local $/;
        my $xml = <$fh>;
        # <testsuite name="t/a.t" ... time="1.5">: one per test file
        while ($xml =~ /<testsuite\b([^>]*)>/g) {
            my $attrs = $1;
            my ($name) = $attrs =~ /\bname="([^"]*)"/ or next;
            my ($time) = $attrs =~ /\btime="([\d.]+)"/ or next;
            $name =~ s/&quot;/"/g; $name =~ s/&lt;/</g; $name =~ s/&gt;/>/g; $name =~ s/&amp;/&/g;
            $times{$name} = $time;
        }
    }
    return %times;
}

=head2 part

  my @files = part(\@tests, $i, $n, \%seconds);

=cut

sub part {
    my ($tests, $i, $n, $times) = @_;
    my %weight;
    my @timed = grep { defined $times->{$_} } @$tests;
    if (@timed) {
        # files the previous run did not have weigh the median time
        my @sorted = sort { $a <=> $b } map { $times->{$_} } @timed;
        my $median = $sorted[ $#sorted / 2 ];
        $weight{$_} = $times->{$_} // $median for @$tests;
    }
    else {
        $weight{$_} = (-s $_) // 0 for @$tests;
    }
    my @load = (0) x $n;
    my %part_of;
    for my $file (sort { $weight{$b} <=> $weight{$a} || $a cmp $b } @$tests) {
        my $lightest = 0;
        for my $p (1 .. $n - 1) { $lightest = $p if $load[$p] < $load[$lightest] }
        $part_of{$file} = $lightest + 1;
        $load[$lightest] += $weight{$file} || 1e-9;
    }
    return grep { $part_of{$_} == $i } @$tests;
}

1;
