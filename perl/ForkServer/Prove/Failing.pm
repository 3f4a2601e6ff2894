package ForkServer::Prove::Failing;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::Failing - the files that failed (or skipped whole) forked and cold too

=head1 DESCRIPTION

A forked file that fails (or, forked from a base with preloads, skips
itself whole) is run again cold, since the fork may be what it failed on.
When it fails or skips cold too, that is its own doing, and running it
twice in every run would cost a perl's start and its loading again. The
record of the run (our own, or prove's C<--state>) keeps such a file: the
next run starts it cold at once, as prove runs it, until it passes.

=head2 remember

  ForkServer::Prove::Failing::remember($state, $file);    # failed (or skipped) forked and cold

=cut

sub remember {
    my ($state, $file) = @_;
    return unless $state;
    eval { $state->results->test($file)->{emperor_fails} = 1; 1 };
    return;
}

=head2 failed_both_ways

  ForkServer::Prove::Failing::failed_both_ways($test_record) -> $bool

=cut

sub failed_both_ways { return $_[0] && $_[0]{emperor_fails} ? 1 : 0 }

=head2 after_test

  ForkServer::Prove::Failing::after_test($state, $file, $parser);    # prove's after_test callback

A file that passed (not a skip of the whole file) is no longer one that
fails both ways.

=cut

sub after_test {
    my ($state, $file, $parser) = @_;
    my $t = $state && eval { $state->results->{tests}{$file} } or return;    # (test() would add it)
    delete $t->{emperor_fails} if $t->{emperor_fails} && !$parser->has_problems && !$parser->skip_all;
    return;
}

1;
